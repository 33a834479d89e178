"""fedke.codec: round trips, packed triangles, and a corpus of bad replies each rejected by name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fedke.codec import (
    LayerSpec,
    PayloadError,
    decode_payload,
    decode_update,
    encode_payload,
    encode_update,
    layer_specs,
    pack_upper,
    payload_nbytes,
    unpack_upper,
    validate_layer,
)
from fedke.payload import EditPayload, LayerPayload

SPECS = [LayerSpec("transformer.h.1.mlp.c_proj", 6, 8), LayerSpec("transformer.h.2.mlp.c_proj", 4, 5)]


def make_layer(rng: np.random.Generator, d_out: int, d_in: int, n_keys: int = 3) -> LayerPayload:
    keys = rng.standard_normal((d_in, n_keys))
    residuals = rng.standard_normal((d_out, n_keys))
    kkt = keys @ keys.T
    rkt = residuals @ keys.T
    delta = np.linalg.solve(np.eye(d_in) + kkt, rkt.T).T
    return LayerPayload(delta=delta, kkt=kkt, rkt=rkt)


def make_payload(seed: int = 0) -> EditPayload:
    rng = np.random.default_rng(seed)
    layers = {spec.name: make_layer(rng, spec.d_out, spec.d_in) for spec in SPECS}
    return EditPayload(layers=layers, n_edits=3, residual_norms=np.abs(rng.standard_normal(3)))


def assert_payload_close(decoded: EditPayload, original: EditPayload, rtol: float) -> None:
    assert decoded.layer_names == original.layer_names
    assert decoded.n_edits == original.n_edits
    for name, layer in original.layers.items():
        for array_name in ("delta", "kkt", "rkt"):
            got = getattr(decoded.layers[name], array_name)
            want = getattr(layer, array_name)
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    np.testing.assert_allclose(decoded.residual_norms, original.residual_norms, rtol=rtol)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_float32():
    payload = make_payload()
    arrays = encode_payload(payload)
    assert arrays[0].dtype == np.uint8
    assert all(a.dtype == np.float32 for a in arrays[1:])
    assert len(arrays) == 1 + 3 * len(SPECS) + 1
    assert_payload_close(decode_payload(arrays, expected=SPECS), payload, rtol=1e-6)


def test_round_trip_float16_and_float64():
    payload = make_payload()
    half = encode_payload(payload, dtype=np.float16)
    assert all(a.dtype == np.float16 for a in half[1:])
    assert_payload_close(decode_payload(half, expected=SPECS), payload, rtol=2e-3)
    assert payload_nbytes(half) < payload_nbytes(encode_payload(payload))
    exact = encode_payload(payload, dtype=np.float64)
    assert_payload_close(decode_payload(exact), payload, rtol=1e-15)


def test_manifest_describes_the_arrays():
    arrays = encode_payload(make_payload(), send_rkt=False)
    manifest = json.loads(arrays[0].tobytes())
    assert manifest["format"] == "fedke.edit_payload" and manifest["version"] == 1
    assert manifest["dtype"] == "float32" and manifest["n_edits"] == 3
    assert [(layer["name"], layer["d_out"], layer["d_in"]) for layer in manifest["layers"]] == [
        (s.name, s.d_out, s.d_in) for s in SPECS
    ]
    assert manifest["layers"][0]["arrays"] == ["delta", "kkt_upper"]
    assert arrays[2].shape == (8 * 9 // 2,)


def test_optional_arrays_decode_as_none_and_can_be_required():
    payload = make_payload()
    decoded = decode_payload(encode_payload(payload, send_delta=False))
    layer = decoded.layers[SPECS[0].name]
    assert layer.delta is None
    np.testing.assert_allclose(layer.rkt, payload.layers[SPECS[0].name].rkt, rtol=1e-6)
    assert layer_specs(decoded) == SPECS
    with pytest.raises(PayloadError, match="'transformer.h.1.mlp.c_proj' delta: required but not sent"):
        decode_payload(encode_payload(payload, send_delta=False), require=("delta",))


def test_pack_upper_round_trip():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 7))
    sym = x + x.T
    packed = pack_upper(sym)
    assert packed.shape == (28,)
    np.testing.assert_array_equal(packed[:7], sym[0])
    np.testing.assert_array_equal(unpack_upper(packed, 7), sym)
    np.testing.assert_array_equal(unpack_upper(pack_upper(np.eye(1)), 1), np.eye(1))
    with pytest.raises(ValueError, match=r"\(28,\)"):
        unpack_upper(packed[:-1], 7)
    with pytest.raises(ValueError, match="square"):
        pack_upper(x[:, :-1])


def test_payload_nbytes_counts_every_array():
    arrays = encode_payload(make_payload())
    assert payload_nbytes(arrays) == sum(a.nbytes for a in arrays)
    float32_body = sum(4 * (s.d_out * s.d_in * 2 + s.d_in * (s.d_in + 1) // 2) for s in SPECS) + 4 * 3
    assert payload_nbytes(arrays) == arrays[0].nbytes + float32_body


def test_update_round_trip():
    rng = np.random.default_rng(2)
    update = {s.name: rng.standard_normal((s.d_out, s.d_in)) for s in SPECS}
    arrays = encode_update(update)
    assert len(arrays) == 1 + len(SPECS)
    decoded = decode_update(arrays, expected=SPECS)
    assert list(decoded) == [s.name for s in SPECS]
    for name, array in update.items():
        assert decoded[name].dtype == np.float64
        np.testing.assert_allclose(decoded[name], array, rtol=1e-6)


def test_survives_flower_serialisation():
    flwr_common = pytest.importorskip("flwr.common")
    payload = make_payload()
    wire = flwr_common.ndarrays_to_parameters(encode_payload(payload))
    assert_payload_close(decode_payload(flwr_common.parameters_to_ndarrays(wire), expected=SPECS), payload, rtol=1e-6)


# ----------------------------------------------------------------------------- the bad corpus


def rewrite_manifest(arrays: list[np.ndarray], edit: Callable[[dict], None]) -> list[np.ndarray]:
    manifest = json.loads(arrays[0].tobytes())
    edit(manifest)
    return [np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8).copy(), *arrays[1:]]


def replaced(arrays: list[np.ndarray], index: int, array: np.ndarray) -> list[np.ndarray]:
    out = list(arrays)
    out[index] = array
    return out


def with_value(arrays: list[np.ndarray], index: int, value: float) -> list[np.ndarray]:
    array = arrays[index].copy()
    array.flat[0] = value
    return replaced(arrays, index, array)


def negative_kkt(arrays: list[np.ndarray]) -> list[np.ndarray]:
    kkt = unpack_upper(arrays[2].astype(np.float64), 8)
    kkt -= 3.0 * np.trace(kkt) * np.outer(np.eye(8)[0], np.eye(8)[0])  # a clearly negative eigenvalue
    return replaced(arrays, 2, pack_upper(kkt).astype(np.float32))


# (id, make the bad reply from a good one, decode keyword arguments, message fragment)
BAD_REPLIES = [
    ("empty reply", lambda a: [], {}, "empty reply"),
    ("NaN in delta", lambda a: with_value(a, 1, np.nan), {}, "layer 'transformer.h.1.mlp.c_proj' delta: 1 non-finite values \\(1 NaN"),
    ("Inf in kkt", lambda a: with_value(a, 2, np.inf), {}, "layer 'transformer.h.1.mlp.c_proj' kkt: 1 non-finite values \\(0 NaN, 1 Inf\\)"),
    ("-Inf in rkt", lambda a: with_value(a, 6, -np.inf), {}, "layer 'transformer.h.2.mlp.c_proj' rkt: 1 non-finite"),
    ("NaN in residual norms", lambda a: with_value(a, -1, np.nan), {}, "residual_norms: 1 non-finite"),
    ("wrong delta shape", lambda a: replaced(a, 1, a[1][:, :-1].copy()), {}, r"delta: wrong shape \(6, 7\), expected \(6, 8\)"),
    ("wrong packed kkt length", lambda a: replaced(a, 2, a[2][:-1].copy()), {}, r"kkt: wrong shape \(35,\), expected \(36,\)"),
    ("kkt sent unpacked", lambda a: replaced(a, 2, np.eye(8, dtype=np.float32)), {}, "kkt: wrong shape"),
    ("missing layer", lambda a: a, {"expected": SPECS + [LayerSpec("transformer.h.3.mlp.c_proj", 6, 8)]}, r"missing layers \['transformer.h.3.mlp.c_proj'\]"),
    ("extra layer", lambda a: a, {"expected": SPECS[:1]}, r"unexpected layers \['transformer.h.2.mlp.c_proj'\]"),
    ("layer of another size", lambda a: a, {"expected": [SPECS[0], LayerSpec(SPECS[1].name, 4, 6)]}, r"\(4, 5\) in the reply, expected \(4, 6\)"),
    ("truncated: last array missing", lambda a: a[:-1], {}, "arrays count mismatch .truncated"),
    ("only the manifest", lambda a: a[:1], {}, "arrays count mismatch .truncated"),
    ("extra array", lambda a: a + [np.zeros(3, np.float32)], {}, "arrays count mismatch .extra"),
    ("int array", lambda a: replaced(a, 1, a[1].astype(np.int64)), {}, "delta: wrong dtype int64"),
    ("bool array", lambda a: replaced(a, 3, a[3] > 0), {}, "rkt: wrong dtype bool"),
    ("complex array", lambda a: replaced(a, 1, a[1].astype(np.complex64)), {}, "delta: wrong dtype complex64"),
    ("object array", lambda a: replaced(a, 1, a[1].astype(object)), {}, "delta: wrong dtype object"),
    ("dtype differs from manifest", lambda a: replaced(a, 4, a[4].astype(np.float64)), {}, "delta: dtype float64 but the manifest says float32"),
    ("not an ndarray", lambda a: replaced(a, 1, a[1].tolist()), {}, "delta: expected a NumPy array, got list"),
    ("negative-eigenvalue kkt", negative_kkt, {}, "layer 'transformer.h.1.mlp.c_proj' kkt: not positive semi-definite"),
    ("absurd norm", lambda a: a, {"max_norm": 1e-3}, "delta: absurd norm"),
    ("absurd kkt norm only", lambda a: a, {"max_norm": {"kkt": 1e-3}}, "kkt: absurd norm"),
    ("absurd delta", lambda a: replaced(a, 1, a[1] * 1e30), {"max_norm": 1e6}, "delta: absurd norm"),
    ("truncated manifest bytes", lambda a: replaced(a, 0, a[0][:-7].copy()), {}, "manifest: not decodable"),
    ("manifest bytes not UTF-8", lambda a: replaced(a, 0, np.full(8, 0xFF, np.uint8)), {}, "manifest: not decodable"),
    ("manifest as float", lambda a: replaced(a, 0, a[0].astype(np.float32)), {}, "first array must be a 1-D uint8 JSON manifest"),
    ("manifest not an object", lambda a: replaced(a, 0, np.frombuffer(b"[1, 2]", np.uint8).copy()), {}, "expected a JSON object"),
    ("wrong format", lambda a: rewrite_manifest(a, lambda m: m.update(format="fedke.update")), {}, "wrong format 'fedke.update'"),
    ("wrong version", lambda a: rewrite_manifest(a, lambda m: m.update(version=99)), {}, "unsupported version 99"),
    ("unknown dtype", lambda a: rewrite_manifest(a, lambda m: m.update(dtype="int8")), {}, "manifest: wrong dtype 'int8'"),
    ("negative n_edits", lambda a: rewrite_manifest(a, lambda m: m.update(n_edits=-1)), {}, "n_edits must be a non-negative integer"),
    ("n_edits not an integer", lambda a: rewrite_manifest(a, lambda m: m.update(n_edits=2.5)), {}, "n_edits must be a non-negative integer"),
    ("duplicate layer", lambda a: rewrite_manifest(a, lambda m: m["layers"].__setitem__(1, m["layers"][0])), {}, "listed twice"),
    ("bad layer dims", lambda a: rewrite_manifest(a, lambda m: m["layers"][0].update(d_in=0)), {}, "positive integer d_out and d_in"),
    ("unknown array list", lambda a: rewrite_manifest(a, lambda m: m["layers"][0].update(arrays=["delta"])), {}, "lists arrays"),
    ("negative residual norm", lambda a: with_value(a, -1, -1.0), {}, "residual_norms: negative values"),
]


@pytest.mark.parametrize("make_bad, kwargs, message", [case[1:] for case in BAD_REPLIES], ids=[c[0] for c in BAD_REPLIES])
def test_bad_replies_are_rejected_by_name(make_bad, kwargs, message):
    good = encode_payload(make_payload())
    decode_payload(good)  # the unmodified reply is fine
    with pytest.raises(PayloadError, match=message):
        decode_payload(make_bad(list(good)), **kwargs)


def test_payload_error_is_a_value_error():
    assert issubclass(PayloadError, ValueError)


# ----------------------------------------------------------------------------- in-process validation


def test_validate_layer_accepts_a_good_layer_and_rejects_asymmetric_kkt():
    layer = make_payload().layers[SPECS[0].name]
    validate_layer(layer, SPECS[0])
    skewed = layer.kkt.copy()
    skewed[0, 1] += 1e-2 * np.abs(layer.kkt).max()
    with pytest.raises(PayloadError, match="layer 'transformer.h.1.mlp.c_proj' kkt: not symmetric"):
        validate_layer(LayerPayload(layer.delta, skewed, layer.rkt), SPECS[0])
    # a rounding-level asymmetry passes
    nearly = layer.kkt.copy()
    nearly[0, 1] *= 1 + 1e-9
    validate_layer(LayerPayload(layer.delta, nearly, layer.rkt), SPECS[0])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda l: LayerPayload(l.delta[:, :-1], l.kkt, l.rkt), r"delta: wrong shape \(6, 7\), expected \(6, 8\)"),
        (lambda l: LayerPayload(l.delta, l.kkt, l.rkt[:-1]), r"rkt: wrong shape \(5, 8\), expected \(6, 8\)"),
        (lambda l: LayerPayload(l.delta, l.kkt[:-1, :-1], l.rkt), "kkt: wrong shape"),
        (lambda l: LayerPayload(l.delta, -l.kkt, l.rkt), "not positive semi-definite"),
        (lambda l: LayerPayload(l.delta * np.nan, l.kkt, l.rkt), "delta: 48 non-finite values"),
        (lambda l: LayerPayload(l.delta.astype(int), l.kkt, l.rkt), "delta: wrong dtype"),
    ],
    ids=["delta shape", "rkt shape", "kkt shape", "negative kkt", "NaN delta", "int delta"],
)
def test_validate_layer_rejects(mutate, message):
    layer = make_payload().layers[SPECS[0].name]
    with pytest.raises(PayloadError, match=message):
        validate_layer(mutate(layer), SPECS[0])


# ----------------------------------------------------------------------------- encode-side and update checks


def test_encode_refuses_bad_payloads():
    payload = make_payload()
    name = SPECS[0].name
    layer = payload.layers[name]
    bad = EditPayload({name: LayerPayload(layer.delta * np.inf, layer.kkt, layer.rkt)}, n_edits=1)
    with pytest.raises(PayloadError, match="delta: .* non-finite"):
        encode_payload(bad)
    huge = EditPayload({name: LayerPayload(layer.delta * 1e6, layer.kkt, layer.rkt)}, n_edits=1)
    with pytest.raises(PayloadError, match="delta: values overflow float16"):
        encode_payload(huge, dtype=np.float16)
    with pytest.raises(PayloadError, match="n_edits"):
        encode_payload(EditPayload(payload.layers, n_edits=-2))
    with pytest.raises(PayloadError, match="wire dtype"):
        encode_payload(payload, dtype=np.int32)
    with pytest.raises(PayloadError, match="wire dtype"):
        encode_update({name: layer.delta}, dtype=np.complex64)


BAD_UPDATES = [
    ("empty", lambda a: [], {}, "empty reply"),
    ("payload instead of update", lambda a: encode_payload(make_payload()), {}, "wrong format 'fedke.edit_payload'"),
    ("missing array", lambda a: a[:-1], {}, "arrays count mismatch"),
    ("NaN", lambda a: with_value(a, 1, np.nan), {}, "update: 1 non-finite"),
    ("wrong shape", lambda a: replaced(a, 2, a[2].T.copy()), {}, r"update: wrong shape \(5, 4\)"),
    ("int dtype", lambda a: replaced(a, 1, a[1].astype(np.int32)), {}, "update: wrong dtype int32"),
    ("missing layer", lambda a: a, {"expected": SPECS + [LayerSpec("x", 1, 1)]}, r"missing layers \['x'\]"),
    ("absurd norm", lambda a: a, {"max_norm": 1e-6}, "update: absurd norm"),
]


@pytest.mark.parametrize("make_bad, kwargs, message", [c[1:] for c in BAD_UPDATES], ids=[c[0] for c in BAD_UPDATES])
def test_bad_updates_are_rejected_by_name(make_bad, kwargs, message):
    rng = np.random.default_rng(3)
    good = encode_update({s.name: rng.standard_normal((s.d_out, s.d_in)) for s in SPECS})
    decode_update(good)
    with pytest.raises(PayloadError, match=message):
        decode_update(make_bad(list(good)), **kwargs)


def test_no_pickle_anywhere_in_the_package():
    source = Path(__file__).resolve().parents[1] / "src" / "fedke"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"allow_pickle\s*=\s*True", text), path
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path

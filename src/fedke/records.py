"""Payloads and updates as named arrays: the wire format of Flower's Message API (``ArrayRecord``).

The legacy path carries a list of arrays led by a JSON manifest (:mod:`fedke.codec`). A Message-API
``ArrayRecord`` names its arrays instead, so no manifest travels::

    client -> server   "<layer>/delta", "<layer>/kkt_upper", "<layer>/rkt" per layer, "residual_norms"
                       (n_edits travels as the MetricRecord's "num-examples", Flower's convention)
    server -> client   "<layer>/update" per layer
    layer-wise step    "<layer>/round_start" per layer, "<layer>/merged" per layer already merged

A layer name may itself contain ``/``: the kind is what follows the last one. These functions only
translate between the two forms; every check (dtype, shape, finiteness, PSD, norm bounds, layer
set, counts) is the codec's own: :func:`payload_from_named` rebuilds the manifest from the
layers the server expects and hands the list to :func:`fedke.codec.decode_payload`, so a named
reply is refused exactly where a listed one would be, for the same reasons.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from fedke.codec import (FORMAT_VERSION, PAYLOAD_FORMAT, UPDATE_FORMAT, LayerSpec, PayloadError, _is_count,
                         _manifest_array, _read_manifest, _short_repr, decode_payload, decode_tensor, decode_update,
                         encode_payload, encode_update)
from fedke.payload import EditPayload

__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "NORMS_KEY", "NUM_EXAMPLES", "named_arrays", "numeric_metrics",
           "to_array_record", "layer_step_from_named", "layer_step_to_named", "payload_from_named", "payload_to_named",
           "split_name", "update_from_named", "update_to_named"]

#: The named entry of a payload's per-request residual norms.
NORMS_KEY = "residual_norms"
_PAYLOAD_KINDS = ("delta", "kkt_upper", "rkt")  # the order of a layer's arrays in the listed form


def split_name(key: Any) -> tuple[str, str]:
    """``(layer, kind)`` of ``"<layer>/<kind>"``; PayloadError for a key without both parts."""
    text = str(key)
    layer, _, kind = text.rpartition("/")
    if not layer or not kind:
        raise PayloadError(f"array {_short_repr(text, 80)}: expected a name '<layer>/<kind>'")
    return layer, kind


def _listed(named: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The record's entries with their keys, refusing a non-mapping."""
    if not isinstance(named, Mapping):
        raise PayloadError(f"arrays: expected a mapping of names to arrays, got {type(named).__name__}")
    return [(str(key), value) for key, value in named.items()]


def _dtype_name(where: str, array: Any) -> str:
    if not isinstance(array, np.ndarray):
        raise PayloadError(f"{where}: expected a NumPy array, got {type(array).__name__}")
    return array.dtype.name


# ----------------------------------------------------------------------------- edit payloads


def payload_to_named(payload: EditPayload, **encode: Any) -> dict[str, np.ndarray]:
    """``payload`` as named wire arrays; ``encode`` as :func:`fedke.codec.encode_payload` takes it
    (``dtype``, ``send_delta``, ``send_rkt``), whose checks and casts apply."""
    arrays = encode_payload(payload, **encode)
    manifest = _read_manifest(arrays, PAYLOAD_FORMAT)
    named: dict[str, np.ndarray] = {}
    position = 1
    for entry in manifest["layers"]:
        for kind in entry["arrays"]:
            named[f"{entry['name']}/{kind}"] = arrays[position]
            position += 1
    named[NORMS_KEY] = arrays[position]
    return named


def payload_from_named(named: Mapping[str, np.ndarray], *, n_edits: Any, expected: Sequence[LayerSpec],
                       **checks: Any) -> EditPayload:
    """Validate and decode named wire arrays into a float64 :class:`EditPayload`.

    ``n_edits`` is the reply's count (its "num-examples"), ``expected`` the layers this round's
    replies must carry; ``checks`` go to :func:`fedke.codec.decode_payload` (``max_norm``,
    ``psd_tol``, ``require``, ``max_edits``). Beyond the codec's own refusals: an array name that is
    not ``"<layer>/<kind>"`` or ``"residual_norms"``, a kind other than delta / kkt_upper / rkt, a
    layer the round does not edit, and a missing ``"residual_norms"``.
    """
    if not _is_count(n_edits, 0):
        raise PayloadError(f"num-examples (the reply's n_edits) must be a non-negative integer, got {_short_repr(n_edits)}")
    specs = {spec.name: spec for spec in expected}
    kinds: dict[str, dict[str, np.ndarray]] = {}
    norms = None
    for key, array in _listed(named):
        if key == NORMS_KEY:
            norms = array
            continue
        layer, kind = split_name(key)
        if kind not in _PAYLOAD_KINDS:
            raise PayloadError(f"array {_short_repr(key, 80)}: unknown kind {_short_repr(kind)} "
                               f"(expected one of {list(_PAYLOAD_KINDS)})")
        if layer not in specs:
            raise PayloadError(f"array {_short_repr(key, 80)}: layer {_short_repr(layer, 80)} is not edited "
                               f"this round (expected layers {sorted(specs)})")
        kinds.setdefault(layer, {})[kind] = array
    if norms is None:
        raise PayloadError(f"arrays: {NORMS_KEY!r} missing (one value per edited request)")
    dtype = _dtype_name(NORMS_KEY, norms)
    layers_manifest, body = [], []
    for layer, present in kinds.items():
        order = [kind for kind in _PAYLOAD_KINDS if kind in present]
        layers_manifest.append({"name": layer, "d_out": specs[layer].d_out, "d_in": specs[layer].d_in, "arrays": order})
        body += [present[kind] for kind in order]
    manifest = {"format": PAYLOAD_FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "n_edits": n_edits,
                "residual_norms": int(norms.size), "layers": layers_manifest}
    return decode_payload([_manifest_array(manifest), *body, norms], expected=expected, **checks)


# ----------------------------------------------------------------------------- cumulative updates


def update_to_named(update: Mapping[str, np.ndarray], *, kind: str = "update", dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The per-layer ``update`` as ``{"<layer>/<kind>": wire array}`` (:func:`fedke.codec.encode_update`'s checks)."""
    arrays = encode_update(update, dtype=dtype)
    return {f"{name}/{kind}": array for name, array in zip(update, arrays[1:])}


def update_from_named(named: Mapping[str, np.ndarray], *, kind: str = "update",
                      expected: Sequence[LayerSpec] | None = None) -> dict[str, np.ndarray]:
    """``{layer: float64 (d_out, d_in)}`` from the entries of ``named`` of this ``kind``, validated by
    :func:`fedke.codec.decode_update` (layer set, shapes, dtype, finite). Entries of other kinds are
    left to the caller; a name that is not ``"<layer>/<kind>"`` is refused."""
    layers_manifest, body, dtypes = [], [], set()
    for key, array in _listed(named):
        layer, found = split_name(key)
        if found != kind:
            continue
        where = f"layer {layer!r} {kind}"
        dtypes.add(_dtype_name(where, array))
        if array.ndim != 2:
            raise PayloadError(f"{where}: wrong shape {array.shape}, expected a (d_out, d_in) matrix")
        layers_manifest.append({"name": layer, "d_out": int(array.shape[0]), "d_in": int(array.shape[1]),
                                "arrays": ["update"]})
        body.append(array)
    if len(dtypes) > 1:
        raise PayloadError(f"{kind}: arrays of mixed dtypes {sorted(dtypes)}")
    dtype = dtypes.pop() if dtypes else "float32"
    manifest = {"format": UPDATE_FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "layers": layers_manifest}
    return decode_update([_manifest_array(manifest), *body], expected=expected)


def layer_step_to_named(round_start: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray], *,
                        dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """A layer-wise sub-round's update (:func:`fedke.codec.encode_layer_step`) as named arrays."""
    return {**update_to_named(round_start, kind="round_start", dtype=dtype),
            **update_to_named(merged, kind="merged", dtype=dtype)}


def layer_step_from_named(named: Mapping[str, np.ndarray], *, expected: Sequence[LayerSpec],
                          merged_expected: Sequence[LayerSpec]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(round_start, merged)`` of :func:`layer_step_to_named`'s arrays; any other kind is refused."""
    for key, _ in _listed(named):
        kind = split_name(key)[1]
        if kind not in ("round_start", "merged"):
            raise PayloadError(f"array {_short_repr(key, 80)}: a layer step carries round_start and merged arrays only")
    return (update_from_named(named, kind="round_start", expected=expected),
            update_from_named(named, kind="merged", expected=merged_expected))


# ----------------------------------------------------------------------------- Flower's records

#: Keys of a message's records (Flower's own strategies use "arrays" and "config" too).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
#: The reply metric that carries a payload's ``n_edits`` (Flower's weighting key).
NUM_EXAMPLES = "num-examples"


def to_array_record(named: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named NumPy arrays as an ``ArrayRecord`` (each an ``.npy`` ``Array``), order kept."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in named.items()})


def named_arrays(record: Any) -> dict[str, np.ndarray]:
    """An ``ArrayRecord`` from a peer as ``{name: ndarray}``, each array read from its ``.npy`` bytes with
    the codec's checked loader (never pickle; the ``Array``'s own dtype and shape fields are not trusted).
    PayloadError names the array that fails."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"{ARRAYS_KEY}: expected an ArrayRecord, got {type(record).__name__}")
    named = {}
    for key, array in record.items():
        if getattr(array, "stype", None) != "numpy.ndarray":
            raise PayloadError(f"array {str(key)[:80]!r}: serialisation {str(getattr(array, 'stype', None))[:40]!r}, "
                               "expected 'numpy.ndarray'")
        named[str(key)] = decode_tensor(f"array {str(key)[:80]!r}", array.data)
    return named


def numeric_metrics(metrics: Mapping[str, Any]) -> MetricRecord:
    """The finite int / float entries of ``metrics`` (booleans as 0 / 1) as a ``MetricRecord``; text is left out."""
    kept: dict[str, int | float] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            kept[str(key)] = int(value)
        elif isinstance(value, (int, np.integer)):
            kept[str(key)] = int(value)
        elif isinstance(value, (float, np.floating)) and math.isfinite(float(value)):
            kept[str(key)] = float(value)
    return MetricRecord(kept)

"""A corpus of bad client replies, built from one good payload (for tests and bench/privacy.py).

Each :class:`BadCase` is a Flower ``FitRes`` a malformed or malicious client could send (real
bytes, as Flower carries them), or a failure Flower would hand the strategy (a client that raised
or timed out), with a regular expression the rejection reason must match. The good payload must
carry ``delta``, ``kkt`` and ``rkt`` on at least two layers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters

from fedke.codec import encode_payload, pack_upper, unpack_upper
from fedke.payload import EditPayload

__all__ = ["PICKLED_NPY", "BadCase", "bad_payload_corpus", "fit_res"]

#: An ``.npy`` object array whose data is a pickle (of ``[{"evil": 1}]``), as ``np.save`` writes it
#: when pickling is allowed. Kept as bytes so that nothing here can pickle; loading it needs the
#: pickling flag of ``np.load`` set, which nothing in fedke or Flower's deserialiser ever does.
PICKLED_NPY = (
    b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }" + b" " * 61 + b"\n"
    b"\x80\x04\x95\x95\x00\x00\x00\x00\x00\x00\x00\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct\x94\x93"
    b"\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01K\x01\x85\x94h"
    b"\x03\x8c\x05dtype\x94\x93\x94\x8c\x02O8\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01|\x94NNNJ\xff\xff\xff\xffJ"
    b"\xff\xff\xff\xffK?t\x94b\x89]\x94}\x94\x8c\x04evil\x94K\x01sat\x94b."
)


@dataclass(frozen=True)
class BadCase:
    """One bad reply (``reply``) or client failure (``failure``) and the reason it must be rejected with."""

    name: str
    reason: str
    reply: FitRes | None = None
    failure: BaseException | None = None


def fit_res(arrays, n: int = 3, code: Code = Code.OK, message: str = "") -> FitRes:
    """A ``FitRes`` carrying ``arrays`` as Flower serialises them."""
    return FitRes(Status(code, message), ndarrays_to_parameters(arrays), n, {})


def _raw(tensors: list[bytes], n: int = 3) -> FitRes:
    return FitRes(Status(Code.OK, ""), Parameters(tensors=tensors, tensor_type="numpy.ndarray"), n, {})


def _manifest(arrays, edit: Callable[[dict], None]):
    manifest = json.loads(arrays[0].tobytes())
    edit(manifest)
    return [np.frombuffer(json.dumps(manifest).encode(), np.uint8).copy(), *arrays[1:]]


def _set(arrays, index, value):
    out = list(arrays)
    array = out[index].copy()
    array.flat[0] = value
    out[index] = array
    return out


def _replace(arrays, index, array):
    out = list(arrays)
    out[index] = array
    return out


def bad_payload_corpus(good: EditPayload) -> list[BadCase]:
    """Every kind of bad reply, each built from ``good`` (float32 wire, arrays delta, kkt, rkt per layer)."""
    names = list(good.layers)
    if len(names) < 2 or any(layer.delta is None or layer.rkt is None for layer in good.layers.values()):
        raise ValueError("the good payload needs delta, kkt and rkt on at least two layers")
    first = good.layers[names[0]]
    d_in = first.kkt.shape[0]

    def arrays():
        return encode_payload(good)

    def negative_eigenvalue():
        a = arrays()
        kkt = unpack_upper(a[2].astype(np.float64), d_in)
        kkt[0, 0] -= 3.0 * max(1.0, float(np.trace(kkt)))
        return _replace(a, 2, pack_upper(kkt).astype(np.float32))

    def subset(keep):
        return encode_payload(EditPayload(layers={n: good.layers[n] for n in keep}, n_edits=good.n_edits,
                                          residual_norms=good.residual_norms))

    def extra_layer():
        layers = dict(good.layers)
        layers["extra.mlp.c_proj"] = first
        return encode_payload(EditPayload(layers=layers, n_edits=good.n_edits, residual_norms=good.residual_norms))

    def truncated():
        tensors = list(ndarrays_to_parameters(arrays()).tensors)
        tensors[1] = tensors[1][: len(tensors[1]) // 2]
        return _raw(tensors)

    def pickled():
        tensors = list(ndarrays_to_parameters(arrays()).tensors)
        tensors[1] = PICKLED_NPY
        return _raw(tensors)

    a = arrays()
    return [
        BadCase("NaN", r"delta: 1 non-finite values \(1 NaN", fit_res(_set(a, 1, np.nan))),
        BadCase("Inf", r"kkt: 1 non-finite values \(0 NaN, 1 Inf", fit_res(_set(a, 2, np.inf))),
        BadCase("wrong shape", "wrong shape", fit_res(_replace(a, 1, a[1][:, :-1].copy()))),
        BadCase("wrong layer set (renamed)", r"unexpected layers \['renamed.mlp.c_proj'\]",
                fit_res(_manifest(a, lambda m: m["layers"][1].update(name="renamed.mlp.c_proj")))),
        BadCase("missing layer", r"missing layers", fit_res(subset(names[:-1]))),
        BadCase("extra layer", r"unexpected layers \['extra.mlp.c_proj'\]", fit_res(extra_layer())),
        BadCase("missing manifest key", "n_edits", fit_res(_manifest(a, lambda m: m.pop("n_edits")))),
        BadCase("missing layer key", "lists arrays", fit_res(_manifest(a, lambda m: m["layers"][0].pop("arrays")))),
        BadCase("extra manifest key", r"unexpected keys \['code'\]", fit_res(_manifest(a, lambda m: m.update(code="exec")))),
        BadCase("extra layer key", r"unexpected keys \['hook'\]", fit_res(_manifest(a, lambda m: m["layers"][0].update(hook=1)))),
        BadCase("extra array", "extra arrays", fit_res(a + [np.zeros(4, np.float32)])),
        BadCase("wrong dtype (int)", "wrong dtype int64", fit_res(_replace(a, 1, a[1].astype(np.int64)))),
        BadCase("wrong dtype (vs manifest)", "dtype float64 but the manifest says float32",
                fit_res(_replace(a, 1, a[1].astype(np.float64)))),
        BadCase("asymmetric kkt (sent unpacked)", "kkt: wrong shape",
                fit_res(_replace(a, 2, np.triu(np.ones((d_in, d_in), np.float32))))),
        BadCase("negative eigenvalue", "not positive semi-definite", fit_res(negative_eigenvalue())),
        BadCase("absurd norm", "absurd norm", fit_res(_replace(a, 3, a[3] * np.float32(1e8)))),
        BadCase("empty reply", "empty reply", _raw([])),
        BadCase("truncated bytes", rf"array 1 \(layer {re.escape(repr(names[0]))} delta\): not a plain NumPy", truncated()),
        BadCase("pickled object array", rf"array 1 \(layer {re.escape(repr(names[0]))} delta\): not a plain NumPy", pickled()),
        BadCase("error status", "reply status", fit_res(a, code=Code.FIT_NOT_IMPLEMENTED, message="boom")),
        BadCase("client raises", "RuntimeError", failure=RuntimeError("ClientApp raised ValueError: editing failed")),
        BadCase("client times out", "TimeoutError", failure=TimeoutError("no reply within round_timeout")),
    ]

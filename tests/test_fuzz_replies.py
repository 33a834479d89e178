"""A seeded fuzzer of the server side: mutated client replies against every strategy, the
streaming fit stage (issue 21) and the Message-API strategies (named ArrayRecord replies, at the end).

Each case is one round: two good replies and one mutated reply (in a random position), or the
two good replies and a mutated entry of Flower's ``failures``. The mutations cover the payload's
bytes, the ``.npy`` headers, dtypes, shapes and memory layouts, ``K K^T`` (indefinite beyond and
within the PSD tolerance, NaN, Inf, huge), the manifest JSON (counts, huge integers, wrong types,
deep nesting, wrong keys), the fit metrics (NaN / Inf / huge / wrong types / not a dict, conflict
claims), ``num_examples``, the status, and failures whose ``str()`` raises. Asserted per case:

* nothing escapes ``aggregate_fit`` (or ``stream_fit`` + ``finish``);
* a mutation that makes the reply bad gets it rejected (or, for failures, recorded) with a reason
  that names the field, array or layer (each mutation says which; a catch-all regex otherwise);
* the round is applied with the good replies exactly as they merge alone: the global update is
  bit for bit that of a round of the two good replies (in the same order);
* a mutation that keeps the reply valid (Fortran order, byte-swapped, ``None`` metrics, unknown
  metric keys, ...) is accepted and merges like the original to 1e-12;
* a random byte flip whose outcome cannot be predicted is either rejected with a named reason
  (and the good replies merge exactly) or accepted, with a finite global update.

``pytest -s tests/test_fuzz_replies.py`` prints the case counts per strategy.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedke.badpayloads import PICKLED_NPY
from fedke.codec import encode_payload
from fedke.conflict import CLAIMS_KEY, ConflictCoordinator, encode_claims
from fedke.payload import EditPayload, LayerPayload
from fedke.simulations.streaming import stream_fit
from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers, synthetic_specs
from fedke.strategies import TIES, CollabEdit, FedAvg, LayerwiseCollabEdit, TaskArithmetic

SPECS = synthetic_specs(d_in=6, d_out=4, layers=2)
NAMES = [spec.name for spec in SPECS]
KINDS = ["collabedit", "fedavg", "task_arithmetic", "ties", "layerwise_collabedit"]
CASES_PER_STRATEGY = 1000
STREAMING_CASES = 1000
SEED = 20240521
N_EDITS = 3
MAX_NORM = 1e7
TOKEN = "ab" * 16

#: What every rejection or failure line must name: a field, an array, a layer, or the reply itself.
NAMED = re.compile(
    r"manifest|layer '|array \d|residual_norms|metrics[\[:]|num_examples|parameters|reply status|arrays count"
    r"|layer set|empty reply|n_edits|client \S+: |failure entry|^[A-Za-z_][A-Za-z0-9_.]*: "
)


@pytest.fixture(autouse=True)
def quiet_flwr_logger():
    """Thousands of rejections are logged at WARNING: keep them out of the console (they are asserted)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


# ----------------------------------------------------------------------------- valid replies


def make_strategy(kind: str):
    common = dict(layer_specs=SPECS, min_fit_clients=1, min_available_clients=1, max_norm=MAX_NORM)
    regs = synthetic_regularisers(SPECS, 2.0)
    if kind == "collabedit":
        return CollabEdit(regularisers=regs, conflict_coordinator=ConflictCoordinator(), **common)
    if kind == "layerwise_collabedit":
        return LayerwiseCollabEdit(regularisers=regs, **common)
    cls = {"fedavg": FedAvg, "task_arithmetic": TaskArithmetic, "ties": TIES}[kind]
    return cls(conflict_coordinator=ConflictCoordinator(), **common)


def payload_of(kind: str, seed: int) -> EditPayload:
    payload = synthetic_payload(SPECS, N_EDITS, seed=seed, with_delta=True, lam=2.0)
    if kind == "layerwise_collabedit":  # step 0: the first layer only, K K^T and R K^T
        layer = payload.layers[NAMES[0]]
        return EditPayload(layers={NAMES[0]: LayerPayload(delta=None, kkt=layer.kkt, rkt=layer.rkt)},
                           n_edits=N_EDITS, residual_norms=payload.residual_norms)
    return payload


def wire(kind: str, payload: EditPayload) -> list[np.ndarray]:
    return encode_payload(payload, send_delta=kind != "layerwise_collabedit")


def roles(kind: str) -> list[str]:
    """What each array of a valid reply is, as the codec names it in its reasons."""
    out = ["manifest"]
    for name in ([NAMES[0]] if kind == "layerwise_collabedit" else NAMES):
        arrays = ["kkt", "rkt"] if kind == "layerwise_collabedit" else ["delta", "kkt", "rkt"]
        out += [f"layer {name!r} {array}" for array in arrays]
    return out + ["residual_norms"]


def fit_res(arrays_or_tensors, *, num_examples: Any = N_EDITS, metrics: Any = None, status: Any = None,
            raw: bool = False) -> FitRes:
    parameters = (Parameters(tensors=arrays_or_tensors, tensor_type="numpy.ndarray") if raw
                  else ndarrays_to_parameters(arrays_or_tensors))
    return FitRes(status if status is not None else Status(Code.OK, ""), parameters, num_examples,
                  {"n_skipped": 0} if metrics is None else metrics)


@dataclass(frozen=True)
class Case:
    """One mutated entry: a reply (``reply``) or a failure (``failure``), and what must happen."""

    mutation: str
    expect: str  # "reject", "failure", "same" (valid, merges like the original), "any" (unpredictable)
    pattern: str | None = None  # the rejection / failure line must match it
    reply: Any = None
    failure: Any = None


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("str() raises")

    def __repr__(self):
        raise RuntimeError("repr() raises")


class UnprintableMessage:
    def __str__(self):
        raise RuntimeError("str() raises")


# ----------------------------------------------------------------------------- mutations


def npy_bytes(array: np.ndarray, *, fortran: bool = False) -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.asfortranarray(array) if fortran else array, allow_pickle=False)
    return stream.getvalue()


def manifest_of(arrays) -> dict:
    return json.loads(arrays[0].tobytes())


def with_manifest(arrays, manifest_text: str | bytes) -> list[np.ndarray]:
    raw = manifest_text.encode() if isinstance(manifest_text, str) else manifest_text
    return [np.frombuffer(raw, np.uint8).copy(), *arrays[1:]]


def edited_manifest(arrays, edit: Callable[[dict], None]) -> list[np.ndarray]:
    manifest = manifest_of(arrays)
    edit(manifest)
    return with_manifest(arrays, json.dumps(manifest))


def replaced(arrays, index: int, array) -> list:
    out = list(arrays)
    out[index] = array
    return out


class Mutator:
    """Draws one mutated entry from a valid reply of ``kind`` (the ``base`` client) per call."""

    def __init__(self, kind: str, base: EditPayload):
        self.kind = kind
        self.base = base
        self.arrays = wire(kind, base)
        self.tensors = list(ndarrays_to_parameters(self.arrays).tensors)
        self.roles = roles(kind)
        self.collab = kind in ("collabedit", "layerwise_collabedit")
        self.claims_read = kind != "layerwise_collabedit"  # a coordinator runs (layer-wise refuses one)
        self.families: list[Callable[[np.random.Generator], Case]] = [
            self.truncated_tensor, self.garbage_tensor, self.non_bytes_tensor, self.tensor_count, self.tensors_container,
            self.header_flip, self.data_flip, self.header_shape, self.dtype, self.shape, self.layout, self.value,
            self.kkt, self.n_edits, self.manifest_counts, self.manifest_structure, self.manifest_text,
            self.count_metrics, self.metrics_container, self.benign_metrics, self.claims, self.num_examples,
            self.status, self.failure, self.not_a_fitres,
        ]

    def __call__(self, rng: np.random.Generator) -> Case:
        return self.families[int(rng.integers(len(self.families)))](rng)

    def index(self, rng) -> int:
        return int(rng.integers(len(self.arrays)))

    def where(self, index: int) -> str:
        return re.escape(self.roles[index])

    # -- bytes of the tensors

    def truncated_tensor(self, rng) -> Case:
        i = self.index(rng)
        tensors = list(self.tensors)
        tensors[i] = tensors[i][: int(rng.integers(len(tensors[i])))]
        return Case("truncated tensor", "reject", rf"^array {i} \({self.where(i)}\): not a plain NumPy",
                    fit_res(tensors, raw=True))

    def garbage_tensor(self, rng) -> Case:
        i = self.index(rng)
        choice = int(rng.integers(4))
        junk = [PICKLED_NPY, b"", rng.bytes(int(rng.integers(1, 300))), b"PK\x03\x04" + rng.bytes(40)][choice]
        return Case("garbage tensor", "reject", rf"^array {i} \({self.where(i)}\): not a plain NumPy",
                    fit_res(replaced(self.tensors, i, junk), raw=True))

    def non_bytes_tensor(self, rng) -> Case:
        i = self.index(rng)
        value = [None, 3, "npy", [1, 2], np.zeros(3)][int(rng.integers(5))]
        return Case("tensor not bytes", "reject", rf"^array {i} \({self.where(i)}\): not a plain NumPy",
                    fit_res(replaced(self.tensors, i, value), raw=True))

    def tensor_count(self, rng) -> Case:
        tensors = list(self.tensors)
        if rng.integers(2):
            tensors.append(npy_bytes(np.zeros(int(rng.integers(1, 5)), np.float32)))
            return Case("extra tensor", "reject", "arrays count mismatch", fit_res(tensors, raw=True))
        del tensors[int(rng.integers(1, len(tensors)))]
        return Case("missing tensor", "reject", "arrays count mismatch", fit_res(tensors, raw=True))

    def tensors_container(self, rng) -> Case:
        choice = int(rng.integers(3))
        if choice == 0:
            return Case("tensors not a list", "reject", "^parameters",
                        fit_res({"0": self.tensors[0]}, raw=True))
        if choice == 1:
            return Case("no parameters", "reject", "^parameters",
                        FitRes(Status(Code.OK, ""), None, N_EDITS, {}))
        return Case("empty reply", "reject", "empty reply", fit_res([], raw=True))

    def header_flip(self, rng) -> Case:
        i = self.index(rng)
        data = bytearray(self.tensors[i])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, min(len(data), 128)))] = int(rng.integers(256))
        return Case("npy header byte flip", "any", None, fit_res(replaced(self.tensors, i, bytes(data)), raw=True))

    def data_flip(self, rng) -> Case:
        i = int(rng.integers(1, len(self.arrays)))
        data = bytearray(self.tensors[i])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(128, len(data)))] = int(rng.integers(256))
        return Case("data byte flip", "any", None, fit_res(replaced(self.tensors, i, bytes(data)), raw=True))

    def header_shape(self, rng) -> Case:
        i = self.index(rng)
        tensor = self.tensors[i]
        header_end = tensor.index(b"\n") + 1
        header = tensor[:header_end].decode("latin1")
        shape = [(10**13,), (0,), (3, 3, 3), (2**62, 4)][int(rng.integers(4))]
        new = re.sub(r"'shape': \([^)]*\)", f"'shape': {shape!r}", header)
        new = new[: header_end - 1].ljust(header_end - 1) + "\n"
        return Case("npy header shape", "reject", rf"^array {i} \({self.where(i)}\): not a plain NumPy",
                    fit_res(replaced(self.tensors, i, new.encode("latin1") + tensor[header_end:]), raw=True))

    # -- arrays

    def dtype(self, rng) -> Case:
        i = self.index(rng)
        dtype = [np.float16, np.float64, np.int32, np.complex64, np.bool_, np.uint8][int(rng.integers(6))]
        array = self.arrays[i].astype(dtype)
        if i == 0:
            if dtype is np.uint8:
                return Case("dtype (unchanged manifest)", "same", None, fit_res(replaced(self.arrays, i, array)))
            return Case("manifest dtype", "reject", "^manifest: the first array must be a 1-D uint8",
                        fit_res(replaced(self.arrays, i, array)))
        return Case(f"dtype {np.dtype(dtype).name}", "reject", rf"^{self.where(i)}: (wrong )?dtype",
                    fit_res(replaced(self.arrays, i, array)))

    def shape(self, rng) -> Case:
        i = int(rng.integers(1, len(self.arrays)))
        array = self.arrays[i]
        choice = int(rng.integers(4))
        if choice == 0 and array.ndim == 2:
            changed = array.T.copy()
        elif choice == 1:
            changed = array.reshape(-1)[:-1].copy() if array.size > 1 else np.zeros(3, array.dtype)
        elif choice == 2:
            changed = array[None].copy()
        else:
            changed = np.concatenate([array.reshape(-1), array.reshape(-1)[:1]]).copy()
        if changed.shape == array.shape:
            changed = array[None].copy()
        return Case("shape", "reject", rf"^{self.where(i)}: wrong shape", fit_res(replaced(self.arrays, i, changed)))

    def layout(self, rng) -> Case:
        """Valid variants: Fortran order, byte-swapped (big-endian) arrays with the same values."""
        i = int(rng.integers(1, len(self.arrays)))
        tensors = list(self.tensors)
        if rng.integers(2):
            tensors[i] = npy_bytes(self.arrays[i], fortran=True)
            return Case("fortran order", "same", None, fit_res(tensors, raw=True))
        tensors[i] = npy_bytes(self.arrays[i].astype(self.arrays[i].dtype.newbyteorder(">")))
        return Case("big-endian", "same", None, fit_res(tensors, raw=True))

    def value(self, rng) -> Case:
        i = int(rng.integers(1, len(self.arrays)))
        array = self.arrays[i].copy()
        flat = array.reshape(-1)
        position = int(rng.integers(flat.size))
        choice = int(rng.integers(5))
        if choice < 3:
            flat[position] = [np.nan, np.inf, -np.inf][choice]
            return Case("non-finite value", "reject", rf"^{self.where(i)}: 1 non-finite", fit_res(replaced(self.arrays, i, array)))
        if choice == 3:
            flat[position] = np.float32(1e30)
            return Case("huge value", "reject", rf"^{self.where(i)}: absurd norm 1(\.\d+)?e\+30",
                        fit_res(replaced(self.arrays, i, array)))
        if self.roles[i] == "residual_norms":
            flat[position] = -1.0
            return Case("negative norm", "reject", "^residual_norms: negative", fit_res(replaced(self.arrays, i, array)))
        flat[position] = np.float32(3e5)
        return Case("large value", "any", None, fit_res(replaced(self.arrays, i, array)))

    def kkt(self, rng) -> Case:
        kkt_indices = [i for i, role in enumerate(self.roles) if role.endswith(" kkt")]
        i = kkt_indices[int(rng.integers(len(kkt_indices)))]
        d_in = SPECS[0].d_in
        name = NAMES[0] if self.kind == "layerwise_collabedit" else NAMES[kkt_indices.index(i)]
        choice = int(rng.integers(5))
        if choice == 0:  # the full matrix, non-symmetric, instead of the packed triangle
            full = rng.standard_normal((d_in, d_in)).astype(np.float32)
            return Case("kkt unpacked, asymmetric", "reject", rf"^{self.where(i)}: wrong shape",
                        fit_res(replaced(self.arrays, i, full)))
        upper = np.triu_indices(d_in)
        if choice == 1:  # clearly indefinite
            matrix = np.eye(d_in) * -float(rng.uniform(1, 10))
            return Case("kkt indefinite", "reject", rf"^{self.where(i)}: not positive semi-definite",
                        fit_res(replaced(self.arrays, i, matrix[upper].astype(np.float32))))
        if choice == 2:  # huge
            return Case("kkt huge", "reject", rf"^{self.where(i)}: absurd norm",
                        fit_res(replaced(self.arrays, i, self.arrays[i] * np.float32(1e9))))
        if choice == 3:  # a -9 eigenvalue, within the PSD tolerance (1e-6 x trace 1e7) and max_norm: next to
            # A = 2 I and the good clients' K K^T (diagonal ~0.5 each) the system would be indefinite
            matrix = np.diag([-9.0] + [2e6] * (d_in - 1))
            mutated = fit_res(replaced(self.arrays, i, matrix[upper].astype(np.float32)))
            if self.collab:
                return Case("kkt indefinite within tolerance", "reject",
                            rf"^layer {re.escape(repr(name))}: A_t \+ sum K K\^T .*not positive definite", mutated)
            return Case("kkt indefinite within tolerance (unused by delta merges)", "same", None, mutated)
        matrix = np.full((d_in, d_in), np.nan)
        return Case("kkt NaN", "reject", rf"^{self.where(i)}: \d+ non-finite",
                    fit_res(replaced(self.arrays, i, matrix[upper].astype(np.float32))))

    # -- manifest

    def n_edits(self, rng) -> Case:
        value = [10**309, 2**53 + 1, -1, 3.0, 1e300, "3", True, None, [3], {"n": 3}, 10**4000 // 10**3990][int(rng.integers(11))]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53:
            return Case("n_edits large but a count", "any", None,
                        fit_res(edited_manifest(self.arrays, lambda m: m.update(n_edits=value))))
        return Case(f"n_edits {type(value).__name__}", "reject", "^manifest: n_edits must be a non-negative integer",
                    fit_res(edited_manifest(self.arrays, lambda m: m.update(n_edits=value))))

    def manifest_counts(self, rng) -> Case:
        choice = int(rng.integers(4))
        if choice == 0:
            value = [N_EDITS + 1, 10**309, -2, 2.5][int(rng.integers(4))]
            return Case("residual_norms count", "reject", "residual_norms",
                        fit_res(edited_manifest(self.arrays, lambda m: m.update(residual_norms=value))))
        key = ["d_out", "d_in"][int(rng.integers(2))]
        value = [0, 10**309, 7, -1, "4", 4.0][int(rng.integers(6))]
        layer = 0

        def edit(m):
            m["layers"][layer][key] = value
        return Case(f"layer {key}", "reject", rf"layer {re.escape(repr(NAMES[0]))}", fit_res(edited_manifest(self.arrays, edit)))

    def manifest_structure(self, rng) -> Case:
        choice = int(rng.integers(7))
        if choice == 0:
            return Case("layer renamed", "reject", r"unexpected layers \['evil'\]",
                        fit_res(edited_manifest(self.arrays, lambda m: m["layers"][0].update(name="evil"))))
        if choice == 1:
            return Case("layer listed twice", "reject", "listed twice|layer set",
                        fit_res(edited_manifest(self.arrays, lambda m: m["layers"].append(dict(m["layers"][0])))))
        if choice == 2:
            return Case("arrays reordered", "reject", "lists arrays",
                        fit_res(edited_manifest(self.arrays, lambda m: m["layers"][0]["arrays"].reverse())))
        if choice == 3:
            key, value = [("format", "other"), ("version", 2), ("dtype", "float128"), ("dtype", None)][int(rng.integers(4))]
            return Case(f"manifest {key}", "reject", f"^manifest: (wrong|unsupported) {key}",
                        fit_res(edited_manifest(self.arrays, lambda m: m.update({key: value}))))
        if choice == 4:
            return Case("manifest extra key", "reject", r"unexpected keys \['hook'\]",
                        fit_res(edited_manifest(self.arrays, lambda m: m.update(hook="exec"))))
        if choice == 5:
            return Case("manifest layers not a list", "reject", "^manifest: 'layers' must be a list",
                        fit_res(edited_manifest(self.arrays, lambda m: m.update(layers={"a": 1}))))
        depth = int(rng.integers(5_000, 200_000))
        text = '{"format":"fedke.edit_payload","x":' + "[" * depth + "]" * depth + "}"
        return Case("manifest nested deeply", "reject", "^manifest: JSON nested too deeply",
                    fit_res(with_manifest(self.arrays, text)))

    def manifest_text(self, rng) -> Case:
        text = self.arrays[0].tobytes()
        choice = int(rng.integers(5))
        if choice == 0:
            return Case("manifest truncated", "reject", "^manifest: not decodable",
                        fit_res(with_manifest(self.arrays, text[: int(rng.integers(1, len(text) - 1))])))
        if choice == 1:
            return Case("manifest not UTF-8", "reject", "^manifest: not decodable",
                        fit_res(with_manifest(self.arrays, b"\xff\xfe" + text)))
        if choice == 2:
            return Case("manifest NaN", "reject", "^manifest: not decodable",
                        fit_res(with_manifest(self.arrays, text.replace(b'"n_edits":3', b'"n_edits":NaN'))))
        if choice == 3:
            return Case("manifest not an object", "reject", "^manifest: expected a JSON object",
                        fit_res(with_manifest(self.arrays, "[1, 2, 3]")))
        return Case("manifest too large", "reject", "^manifest: .* bytes, more than",
                    fit_res(with_manifest(self.arrays, b" " * ((1 << 20) + 1) + text)))

    # -- metrics, num_examples, status

    def count_metrics(self, rng) -> Case:
        key = ["n_skipped", "targets_reused"][int(rng.integers(2))]
        value = [np.nan, np.inf, -np.inf, -1, 1.5, 10**30, 10**400, "3", b"3", True, [1], None, 2][int(rng.integers(13))]
        if key == "targets_reused" and value == 2:
            value = 5
        if key == "n_skipped" and isinstance(value, int) and not isinstance(value, bool) and value == 2:
            return Case("n_skipped valid", "same", None, fit_res(self.arrays, metrics={key: value}))
        return Case(f"metrics {key} {type(value).__name__}", "reject", rf"^metrics\[{key!r}\]",
                    fit_res(self.arrays, metrics={key: value}))

    def metrics_container(self, rng) -> Case:
        value = [["n_skipped", 1], "n_skipped=1", 3.0, (1, 2), {1, 2}][int(rng.integers(5))]
        return Case(f"metrics {type(value).__name__}", "reject", "^metrics: expected a dict",
                    fit_res(self.arrays, metrics=value))

    def benign_metrics(self, rng) -> Case:
        metrics = [{}, {"loss": np.nan, "other": np.inf}, {"edit_seconds": 1e308, "note": "x" * 1000},
                   {"n_skipped": 3.0, "targets_reused": 1}][int(rng.integers(4))]
        if self.kind != "layerwise_collabedit" and "targets_reused" in metrics:
            metrics = dict(metrics)
        return Case("benign metrics", "same", None, fit_res(self.arrays, metrics=dict(metrics)))

    def claims(self, rng) -> Case:
        choice = int(rng.integers(6))
        value = [
            "[" * int(rng.integers(5_000, 100_000)) + "]" * 3,
            "[" * 50_000 + "]" * 50_000,
            "not json",
            encode_claims([(TOKEN, TOKEN, 1.0)]).replace("1.0", "NaN"),
            12345,
            json.dumps({"v": 1, "claims": [[TOKEN, TOKEN, 1.0]] * 3, "failed": 10**30}),
        ][choice]
        mutated = fit_res(self.arrays, metrics={CLAIMS_KEY: value})
        if not self.claims_read:
            return Case("claims (not read without a coordinator)", "same", None, mutated)
        return Case("claims malformed", "reject", re.escape(f"metrics[{CLAIMS_KEY!r}]"), mutated)

    def num_examples(self, rng) -> Case:
        value = [-1, np.nan, np.inf, 1.5, "3", None, 10**30, True, [3]][int(rng.integers(9))]
        return Case(f"num_examples {type(value).__name__}", "reject", "^num_examples",
                    fit_res(self.arrays, num_examples=value))

    def status(self, rng) -> Case:
        code = [Code.FIT_NOT_IMPLEMENTED, Code.GET_PARAMETERS_NOT_IMPLEMENTED][int(rng.integers(2))]
        message = ["boom", UnprintableMessage(), "x" * 10_000][int(rng.integers(3))]
        return Case("status not OK", "reject", "^reply status", fit_res(self.arrays, status=Status(code, message)))

    def failure(self, rng) -> Case:
        choice = int(rng.integers(6))
        if choice == 0:
            return Case("failure unprintable", "failure", "^Unprintable: <Unprintable: unprintable>", failure=Unprintable())
        if choice == 1:
            return Case("failure message unprintable", "failure", r"^client \S+: status",
                        failure=(SimpleNamespace(cid="f"), FitRes(Status(Code.FIT_NOT_IMPLEMENTED, UnprintableMessage()),
                                                                   Parameters([], ""), 0, {})))
        if choice == 2:
            return Case("failure pair with unprintable reply", "failure", r"^client \S+: <Unprintable",
                        failure=(SimpleNamespace(cid="f"), Unprintable()))
        if choice == 3:
            return Case("failure huge message", "failure", "^RuntimeError", failure=RuntimeError("x" * 100_000))
        if choice == 4:
            return Case("failure of three", "failure", r"^unrecognised failure entry \(tuple\)", failure=(1, 2, 3))
        return Case("failure timeout", "failure", "^TimeoutError", failure=TimeoutError("late"))

    def not_a_fitres(self, rng) -> Case:
        value = [None, "reply", 42, SimpleNamespace(status=Status(Code.OK, ""), num_examples=3)][int(rng.integers(4))]
        return Case(f"reply is {type(value).__name__}", "reject", "^num_examples|^parameters", value)


# ----------------------------------------------------------------------------- the oracle


def same_bits(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[name], b[name]) for name in NAMES)


def close(a: dict, b: dict) -> bool:
    return all(np.allclose(a[name], b[name], rtol=1e-12, atol=1e-14) for name in NAMES)


class Fuzzer:
    """Runs cases against one strategy kind and keeps the counts."""

    def __init__(self, kind: str):
        self.kind = kind
        self.good = [(SimpleNamespace(cid=f"good-{i}"), fit_res(wire(kind, payload_of(kind, i)))) for i in range(2)]
        self.base = payload_of(kind, 2)
        self.base_reply = fit_res(wire(kind, self.base))
        self.mutator = Mutator(kind, self.base)
        self.alone = self.reference([])
        self.with_base = {position: self.reference([(position, self.base_reply)]) for position in range(3)}
        self.counts: Counter = Counter()

    def reference(self, extra) -> dict:
        strategy = make_strategy(self.kind)
        results = list(self.good)
        for position, res in extra:
            results.insert(position, (SimpleNamespace(cid="bad"), res))
        _, metrics = strategy.aggregate_fit(1, results, [])
        assert metrics["applied"] and metrics["n_accepted"] == len(results)
        return {name: a.copy() for name, a in strategy.global_update.items()}

    def aggregate(self, results, failures, streaming: bool, what: str) -> tuple[Any, dict]:
        strategy = make_strategy(self.kind)
        try:
            if streaming:
                metrics = stream_round(strategy, results, failures)
            else:
                _, metrics = strategy.aggregate_fit(1, results, failures)
        except BaseException as escaped:  # noqa: BLE001 - the defect this fuzzer hunts
            self.counts["escapes"] += 1
            raise AssertionError(f"{self.kind}: {what} escaped: {type(escaped).__name__}") from escaped
        return strategy, metrics

    def run_one(self, case: Case, position: int, streaming: bool = False) -> None:
        """A reply that may be valid: alone next to the good ones, at ``position``."""
        results = list(self.good)
        results.insert(position, (SimpleNamespace(cid="bad"), case.reply))
        strategy, metrics = self.aggregate(results, [], streaming, case.mutation)
        update = strategy.global_update
        if metrics["n_accepted"] == 3:
            assert case.expect in ("same", "any") and metrics["applied"], (self.kind, case.mutation, metrics)
            assert all(np.isfinite(a).all() for a in update.values())
            if case.expect == "same":
                assert close(update, self.with_base[position]), (self.kind, case.mutation)
            self.counts["accepted"] += 1
            return
        assert case.expect == "any", (self.kind, case.mutation, metrics, strategy.last_rejections, strategy.last_failures)
        self.check_rejected(strategy, metrics, [case], ["bad"], streaming)

    def run_batch(self, cases: list[Case], rng: np.random.Generator, streaming: bool = False) -> None:
        """Replies that must be rejected and failures, all in one round with the two good replies
        (at random positions, in their order): each must be refused, the good ones merge as alone."""
        results = [(SimpleNamespace(cid=f"bad-{j}"), case.reply) for j, case in enumerate(cases) if case.failure is None]
        failures = [case.failure for case in cases if case.failure is not None]
        for position, good in zip(sorted(rng.choice(len(results) + 2, size=2, replace=False)), self.good):
            results.insert(int(position), good)
        strategy, metrics = self.aggregate(results, failures, streaming, ", ".join(c.mutation for c in cases))
        cids = [None if case.failure is not None else f"bad-{j}" for j, case in enumerate(cases)]
        self.check_rejected(strategy, metrics, cases, cids, streaming)

    def check_rejected(self, strategy, metrics: dict, cases: list[Case], cids: list[str | None], streaming: bool) -> None:
        """Each case refused with a named reason matching its pattern; the good replies merged as alone."""
        what = [case.mutation for case in cases]
        assert metrics["applied"] and metrics["n_accepted"] == 2, (self.kind, what, metrics, strategy.last_rejections)
        assert metrics["n_rejected"] + metrics["n_failures"] == len(cases), (self.kind, what, metrics)
        rejections = dict(strategy.last_rejections)
        failure_lines = iter(strategy.last_failures)
        for case, cid in zip(cases, cids):
            if case.failure is not None:
                line, expected = next(failure_lines), "failure"
            else:
                line, expected = rejections.get(cid), "reject"
                if line is None and streaming:  # the grid could not carry it: that node's failure
                    self.counts["failures"] += 1
                    continue
            assert line is not None, (self.kind, case.mutation, strategy.last_rejections)
            assert NAMED.search(line), (self.kind, case.mutation, line)
            if case.pattern is not None:
                assert re.search(case.pattern, line), (self.kind, case.mutation, case.pattern, line)
            self.counts["failures" if expected == "failure" else "rejected"] += 1
        for line in strategy.last_failures:
            assert NAMED.search(line), (self.kind, line)
        if not same_bits(strategy.global_update, self.alone):
            self.counts["poisoned"] += 1
            raise AssertionError(f"{self.kind}: {what}: the good replies did not merge as alone")

    def fuzz(self, rng: np.random.Generator, n_cases: int, streaming: bool = False, batch: int = 8) -> Counter:
        """``n_cases`` mutated entries: the ones that must be refused in rounds of up to ``batch``, the
        others one per round. Returns the mutation families drawn."""
        families: Counter = Counter()
        pending: list[Case] = []
        for _ in range(n_cases):
            case = self.mutator(rng)
            families[case.mutation.split()[0]] += 1
            if case.expect in ("same", "any"):
                self.run_one(case, int(rng.integers(3)), streaming)
                continue
            pending.append(case)
            if len(pending) == batch:
                self.run_batch(pending, rng, streaming)
                pending = []
        if pending:
            self.run_batch(pending, rng, streaming)
        return families


# ----------------------------------------------------------------------------- the streaming stage


class Grid:
    """An in-memory Grid answering each TRAIN message with a prepared reply Message."""

    def __init__(self, answers: dict[int, Any]):
        self.answers = answers
        self.inbox: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.inbox) + 1}-{message.metadata.dst_node_id}"
            message.metadata.__dict__["_message_id"] = message_id
            self.inbox[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for message_id in message_ids:
            message = self.inbox.pop(message_id, None)
            if message is not None:
                out.append(self.answers[message.metadata.dst_node_id](message))
        return out


def as_message(res: Any) -> Callable[[Message], Message]:
    """The reply Message a node sends for ``res``; what Flower cannot carry becomes a bare RecordDict
    (the server's conversion then fails: a failure of that node)."""
    try:
        content = compat.fitres_to_recorddict(res, keep_input=True)
    except Exception:  # noqa: BLE001 - not representable on the grid
        content = RecordDict()
    return lambda message: Message(content, reply_to=message)


def stream_round(strategy, results, failures) -> dict:
    answers = {}
    instructions = []
    grid = Grid(answers)
    for node, (proxy, res) in enumerate(results, start=1):
        answers[node] = as_message(res)
        instructions.append((SimpleNamespace(cid=proxy.cid, node_id=node, grid=grid),
                             FitIns(Parameters([], "numpy.ndarray"), {})))
    aggregation = strategy.begin_round(1)
    for failure in failures:
        aggregation.add_failure(failure)
    stream_fit(aggregation, instructions, timeout=None, group_id=1, poll_interval=0.0)
    _, metrics = aggregation.finish()
    return metrics


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


# ----------------------------------------------------------------------------- the tests


def report(label: str, counts: Counter, seconds: float, record_property) -> None:
    total = counts["accepted"] + counts["rejected"] + counts["failures"]
    line = (f"fuzz {label}: {total} cases ({counts['rejected']} rejected, {counts['failures']} failures, "
            f"{counts['accepted']} accepted), {counts['escapes']} escapes, {counts['poisoned']} poisoned rounds, "
            f"{seconds:.2f} s")
    print(line)
    record_property(f"fuzz_{label}", line)


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_replies_never_escape_nor_poison_the_round(kind, record_property):
    rng = np.random.default_rng([SEED, KINDS.index(kind)])
    fuzzer = Fuzzer(kind)
    tic = time.perf_counter()
    families = fuzzer.fuzz(rng, CASES_PER_STRATEGY)
    report(kind, fuzzer.counts, time.perf_counter() - tic, record_property)
    total = sum(fuzzer.counts[k] for k in ("accepted", "rejected", "failures"))
    assert total == CASES_PER_STRATEGY and fuzzer.counts["escapes"] == fuzzer.counts["poisoned"] == 0
    assert len(families) >= 20  # the mutation families were all drawn


@pytest.mark.parametrize("kind", ["collabedit", "fedavg"])
def test_fuzzed_replies_through_the_streaming_fit_stage(kind, task_identity, record_property):
    rng = np.random.default_rng([SEED, 99, KINDS.index(kind)])
    fuzzer = Fuzzer(kind)
    tic = time.perf_counter()
    fuzzer.fuzz(rng, STREAMING_CASES // 2, streaming=True)
    report(f"streaming/{kind}", fuzzer.counts, time.perf_counter() - tic, record_property)
    assert fuzzer.counts["escapes"] == fuzzer.counts["poisoned"] == 0


# ----------------------------------------------------------------------------- the Message API

#: What a Message-API rejection names: an array by its name, the record, the count, or a codec field.
MESSAGE_NAMED = re.compile(r"array '|arrays: |num-examples|reply: |metrics\[|node \S+: |layer '|manifest: |layer set|residual_norms")


def reply_message(node: int, content: RecordDict | None = None, error: Any = None) -> Message:
    """A reply from ``node`` as the SuperLink hands it to the ServerApp."""
    from flwr.app import Metadata

    metadata = Metadata(run_id=7, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"m{node}",
                        group_id="1", created_at=0.0, ttl=3600, message_type="train")
    return Message(metadata=metadata, content=content, error=error)


def named_content(named: dict, metrics: Any = None, *, raw: dict | None = None) -> RecordDict:
    """``{"arrays": ArrayRecord(named), "metrics": MetricRecord(...)}``; ``raw``: Arrays as they are."""
    from flwr.app import Array, ArrayRecord, MetricRecord

    arrays = {key: Array(np.ascontiguousarray(value)) for key, value in named.items()}
    arrays.update(raw or {})
    records = {"arrays": ArrayRecord(arrays)}
    records["metrics"] = MetricRecord({"num-examples": N_EDITS} if metrics is None else metrics)
    return RecordDict(records)


class NamedMutator:
    """Draws one mutated Message-API reply (named arrays, MetricRecord) from a valid one of ``kind``."""

    def __init__(self, kind: str, base: EditPayload):
        from fedke.records import payload_to_named

        self.kind = kind
        self.named = payload_to_named(base, send_delta=kind != "layerwise_collabedit")
        self.keys = list(self.named)
        self.families: list[Callable[[np.random.Generator], Case]] = [
            self.missing, self.unknown, self.dtype, self.shape, self.value, self.kkt, self.npy_bytes, self.stype,
            self.num_examples, self.records, self.count_metrics, self.error, self.benign,
        ]

    def __call__(self, rng: np.random.Generator) -> Case:
        return self.families[int(rng.integers(len(self.families)))](rng)

    def key(self, rng) -> str:
        return self.keys[int(rng.integers(len(self.keys)))]

    def with_array(self, key: str, array: Any) -> dict:
        return {**self.named, key: array}

    @staticmethod
    def where(key: str) -> str:
        if key == "residual_norms":
            return "residual_norms"
        layer, kind = key.rsplit("/", 1)
        return re.escape(f"layer {layer!r} {'kkt' if kind == 'kkt_upper' else kind}")

    def missing(self, rng) -> Case:
        key = self.key(rng)
        named = {k: v for k, v in self.named.items() if k != key}
        kind = key.rsplit("/", 1)[-1]
        if kind in ("delta", "rkt"):  # a payload may leave one out; the strategy's required arrays decide
            return Case(f"missing {kind}", "any", r"required but not sent|lists arrays|nothing to merge", named_content(named))
        pattern = "'residual_norms' missing" if key == "residual_norms" else "lists arrays|layer set differs"
        return Case(f"missing {kind}", "reject", pattern, named_content(named))

    def unknown(self, rng) -> Case:
        choice = int(rng.integers(3))
        array = np.zeros((4, 6), np.float32)
        if choice == 0:
            return Case("unknown kind", "reject", "unknown kind", named_content({**self.named, f"{NAMES[0]}/keys": array}))
        if choice == 1:
            return Case("unknown layer", "reject", "is not edited this round",
                        named_content({**self.named, "h.99.mlp/rkt": array}))
        return Case("unnamed array", "reject", "expected a name '<layer>/<kind>'", named_content({**self.named, "rkt": array}))

    def dtype(self, rng) -> Case:
        key = self.key(rng)
        dtype = [np.float16, np.float64, np.int32, np.complex64, np.bool_, np.uint8][int(rng.integers(6))]
        where = "residual_norms" if key == "residual_norms" else self.where(key)
        pattern = "manifest: wrong dtype" if key == "residual_norms" and np.dtype(dtype).name not in ("float16", "float64") \
            else rf"{where}: (wrong )?dtype|dtype .* but the manifest says"
        if key == "residual_norms":  # the norms' dtype sets the reply's: every other array then differs
            pattern = rf"manifest: wrong dtype|{re.escape('dtype float32 but the manifest says')}"
        return Case(f"dtype {np.dtype(dtype).name}", "reject", pattern,
                    named_content(self.with_array(key, self.named[key].astype(dtype))))

    def shape(self, rng) -> Case:
        key = self.key(rng)
        array = self.named[key]
        changed = array.T.copy() if array.ndim == 2 and rng.integers(2) else array.reshape(-1)[:-1].copy()
        if key == "residual_norms":  # any length is a valid count of norms: a matrix is not
            changed = array[None].copy()
        if changed.shape == array.shape:
            changed = array[None].copy()
        return Case("shape", "reject", rf"{self.where(key)}: wrong shape", named_content(self.with_array(key, changed)))

    def value(self, rng) -> Case:
        key = self.key(rng)
        array = self.named[key].copy()
        flat = array.reshape(-1)
        choice = int(rng.integers(4))
        position = int(rng.integers(flat.size))
        if choice < 2:
            flat[position] = [np.nan, np.inf][choice]
            return Case("non-finite value", "reject", rf"{self.where(key)}: 1 non-finite",
                        named_content(self.with_array(key, array)))
        if choice == 2:
            flat[position] = np.float32(1e30)
            return Case("huge value", "reject", rf"{self.where(key)}: absurd norm",
                        named_content(self.with_array(key, array)))
        if key == "residual_norms":
            flat[position] = -1.0
            return Case("negative norm", "reject", "residual_norms: negative", named_content(self.with_array(key, array)))
        flat[position] = np.float32(3e5)
        return Case("large value", "any", None, named_content(self.with_array(key, array)))

    def kkt(self, rng) -> Case:
        from fedke.codec import pack_upper

        key = [k for k in self.keys if k.endswith("/kkt_upper")][0]
        n = SPECS[0].d_in
        return Case("indefinite kkt", "reject", rf"{self.where(key)}: not positive semi-definite",
                    named_content(self.with_array(key, pack_upper(-10.0 * np.eye(n)).astype(np.float32))))

    def npy_bytes(self, rng) -> Case:
        from flwr.app import Array

        key = self.key(rng)
        array = Array(np.ascontiguousarray(self.named[key]))
        data = bytes(array.data)
        array.data = [PICKLED_NPY, b"", data[: int(rng.integers(len(data)))], rng.bytes(40)][int(rng.integers(4))]
        named = {k: v for k, v in self.named.items() if k != key}
        return Case("npy bytes", "reject", rf"array '{re.escape(key)}': not a plain NumPy",
                    named_content(named, raw={key: array}))

    def stype(self, rng) -> Case:
        from flwr.app import Array

        key = self.key(rng)
        array = Array(np.ascontiguousarray(self.named[key]))
        array.stype = ["torch.Tensor", "pickle", ""][int(rng.integers(3))]
        named = {k: v for k, v in self.named.items() if k != key}
        return Case("serialisation", "reject", rf"array '{re.escape(key)}': serialisation",
                    named_content(named, raw={key: array}))

    def num_examples(self, rng) -> Case:
        value = [-1, 2.5, 2**60, None, [3]][int(rng.integers(5))]
        metrics = {} if value is None else {"num-examples": value}
        return Case(f"num-examples {value!r}", "reject", "num-examples|n_edits", named_content(self.named, metrics))

    def records(self, rng) -> Case:
        from flwr.app import ConfigRecord, MetricRecord

        choice = int(rng.integers(3))
        if choice == 0:
            return Case("no arrays record", "reject", "reply: no ArrayRecord",
                        RecordDict({"metrics": MetricRecord({"num-examples": N_EDITS})}))
        if choice == 1:
            return Case("arrays under another name", "reject", "reply: no ArrayRecord",
                        RecordDict({"payload": named_content(self.named).array_records["arrays"],
                                    "metrics": MetricRecord({"num-examples": N_EDITS})}))
        return Case("metrics as text", "reject", "num-examples",
                    RecordDict({"arrays": named_content(self.named).array_records["arrays"],
                                "metrics": ConfigRecord({"num-examples": "3"})}))

    def count_metrics(self, rng) -> Case:
        value = [-1, 2.5, 2**60, float("nan")][int(rng.integers(4))]
        return Case("n_skipped", "reject", r"metrics\['n_skipped'\]",
                    named_content(self.named, {"num-examples": N_EDITS, "n_skipped": value}))

    def error(self, rng) -> Case:
        from flwr.app import Error

        return Case("error reply", "failure", "node \\S+: error", failure=Error(code=int(rng.integers(5)),
                                                                              reason="the node's editor crashed"))

    def benign(self, rng) -> Case:
        choice = int(rng.integers(2))
        if choice == 0:
            named = dict(reversed(list(self.named.items())))
            return Case("reordered arrays", "same", None, named_content(named))
        return Case("extra metrics", "same", None,
                    named_content(self.named, {"num-examples": N_EDITS, "edit_seconds": 1.5, "unknown": [1, 2]}))


class MessageFuzzer:
    """:class:`Fuzzer`'s checks for Message-API replies: each round two good replies and mutated ones,
    aggregated by ``MessageEditStrategy(strategy).aggregate_train``."""

    def __init__(self, kind: str):
        from fedke.records import payload_to_named

        self.kind = kind
        send_delta = kind != "layerwise_collabedit"
        self.good = [named_content(payload_to_named(payload_of(kind, i), send_delta=send_delta)) for i in range(2)]
        self.base = payload_of(kind, 2)
        self.mutator = NamedMutator(kind, self.base)
        self.alone = self.reference([])
        self.with_base = {p: self.reference([(p, named_content(self.mutator.named))]) for p in range(3)}
        self.counts: Counter = Counter()

    def aggregate(self, contents, failures=()):
        from fedke.strategies.message import MessageEditStrategy

        strategy = MessageEditStrategy(make_strategy(self.kind))
        replies = [reply_message(node, content) for node, content in enumerate(contents, start=1)]
        replies += [reply_message(100 + j, error=error) for j, error in enumerate(failures)]
        try:
            strategy.aggregate_train(1, replies)
        except BaseException as escaped:  # noqa: BLE001 - the defect this fuzzer hunts
            self.counts["escapes"] += 1
            raise AssertionError(f"{self.kind}: escaped: {type(escaped).__name__}: {escaped}") from escaped
        return strategy.inner, strategy.inner.round_metrics[-1]

    def reference(self, extra) -> dict:
        contents = list(self.good)
        for position, content in extra:
            contents.insert(position, content)
        inner, metrics = self.aggregate(contents)
        assert metrics["applied"] and metrics["n_accepted"] == len(contents)
        return {name: a.copy() for name, a in inner.global_update.items()}

    def run(self, case: Case, rng) -> None:
        position = int(rng.integers(3))
        contents = list(self.good)
        if case.failure is None:
            contents.insert(position, case.reply)
        inner, metrics = self.aggregate(contents, [case.failure] if case.failure is not None else [])
        if metrics["n_accepted"] == 3:
            assert case.expect in ("same", "any") and metrics["applied"], (self.kind, case.mutation, metrics)
            assert all(np.isfinite(a).all() for a in inner.global_update.values())
            if case.expect == "same":
                assert close(inner.global_update, self.with_base[position]), (self.kind, case.mutation)
            self.counts["accepted"] += 1
            return
        assert case.expect != "same", (self.kind, case.mutation, inner.last_rejections)
        assert metrics["applied"] and metrics["n_accepted"] == 2, (self.kind, case.mutation, metrics, inner.last_rejections)
        lines = [reason for _, reason in inner.last_rejections] + list(inner.last_failures)
        assert len(lines) == 1, (self.kind, case.mutation, lines)
        assert MESSAGE_NAMED.search(lines[0]), (self.kind, case.mutation, lines[0])
        if case.pattern is not None:
            assert re.search(case.pattern, lines[0]), (self.kind, case.mutation, case.pattern, lines[0])
        self.counts["failures" if case.failure is not None else "rejected"] += 1
        if not same_bits(inner.global_update, self.alone):
            self.counts["poisoned"] += 1
            raise AssertionError(f"{self.kind}: {case.mutation}: the good replies did not merge as alone")


MESSAGE_CASES = 200


@pytest.mark.parametrize("kind", [kind if kind == "collabedit" else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in KINDS])
def test_fuzzed_message_api_replies_never_escape_nor_poison_the_round(kind, record_property):
    rng = np.random.default_rng([SEED, 7, KINDS.index(kind)])
    fuzzer = MessageFuzzer(kind)
    tic = time.perf_counter()
    families: Counter = Counter()
    for _ in range(MESSAGE_CASES):
        case = fuzzer.mutator(rng)
        families[case.mutation.split()[0]] += 1
        fuzzer.run(case, rng)
    report(f"message/{kind}", fuzzer.counts, time.perf_counter() - tic, record_property)
    assert sum(fuzzer.counts[k] for k in ("accepted", "rejected", "failures")) == MESSAGE_CASES
    assert fuzzer.counts["escapes"] == fuzzer.counts["poisoned"] == 0
    assert len(families) >= 12  # the mutation families were all drawn

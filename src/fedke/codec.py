"""The wire format of fedke payloads: a list of NumPy arrays, as Flower carries parameters.

Client -> server (:func:`encode_payload` / :func:`decode_payload`)::

    [manifest, (delta?, kkt_upper, rkt?) per layer ..., residual_norms]

Server -> client (:func:`encode_update` / :func:`decode_update`)::

    [manifest, update per layer ...]

Server -> client in a sub-round of layer-wise CollabEdit (:func:`encode_layer_step` /
:func:`decode_layer_step`): two such update blocks, one after the other::

    [manifest, round-start update per layer ..., manifest, merged update per layer l_1..l_{i-1} ...]

The manifest is UTF-8 JSON in a 1-D uint8 array: the format name and version, the wire dtype,
``n_edits`` and, per layer in order, its name, ``d_out``, ``d_in`` and the arrays that follow.
``kkt`` travels as its packed upper triangle (``n (n + 1) / 2`` values, row-major), so it is
symmetric by construction. Arrays are float32 on the wire by default (float16 or float64 on
request) and come back as float64.

Decoding validates everything before anything is built and raises :class:`PayloadError` naming
the layer, the array and what was expected. No pickle anywhere: the manifest is JSON, arrays are
plain numeric ndarrays, and object arrays are refused.

Why one file of about 700 lines: it is the one gate every byte from a client passes; keeping each
check (dtype, header, shape, finiteness, layer set, counts) in one place is what makes it
reviewable as a whole.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.linalg

from fedke.payload import EditPayload, LayerPayload

__all__ = [
    "MAX_COUNT",
    "PAYLOAD_FORMAT",
    "UPDATE_FORMAT",
    "FORMAT_VERSION",
    "LayerSpec",
    "PayloadError",
    "decode_layer_step",
    "decode_payload",
    "decode_tensor",
    "decode_tensors",
    "decode_update",
    "encode_layer_step",
    "encode_payload",
    "encode_update",
    "layer_specs",
    "pack_upper",
    "payload_nbytes",
    "unpack_upper",
    "payload_array_names",
    "validate_layer",
]

PAYLOAD_FORMAT = "fedke.edit_payload"
UPDATE_FORMAT = "fedke.update"
FORMAT_VERSION = 1
WIRE_DTYPES = ("float16", "float32", "float64")
MAX_MANIFEST_BYTES = 1 << 20
#: The largest count a manifest may carry (``n_edits``, ``residual_norms``, ``d_out``, ``d_in``): 2**53,
#: the last integer float64 holds exactly, so every count converts to float without overflow or rounding.
MAX_COUNT = 1 << 53
_PAYLOAD_KEYS = frozenset({"format", "version", "dtype", "n_edits", "residual_norms", "layers"})
_UPDATE_KEYS = frozenset({"format", "version", "dtype", "layers"})
_LAYER_KEYS = frozenset({"name", "d_out", "d_in", "arrays"})

class PayloadError(ValueError):
    """A payload that cannot be trusted: the message says which layer, which array, what was expected."""


@dataclass(frozen=True)
class LayerSpec:
    """The name and shape ``(d_out, d_in)`` of one edited layer's weight (``v = W k``)."""

    name: str
    d_out: int
    d_in: int


def layer_specs(payload: EditPayload) -> list[LayerSpec]:
    """The :class:`LayerSpec` of every layer of ``payload``, in order."""
    return [LayerSpec(name, _d_out_of(layer), int(layer.kkt.shape[0])) for name, layer in payload.layers.items()]


def _d_out_of(layer: LayerPayload) -> int:
    """``d_out`` from ``delta`` or, when it was not sent, from ``rkt`` (0 when neither is present)."""
    source = layer.delta if layer.delta is not None else layer.rkt
    return 0 if source is None else int(source.shape[0])


# ----------------------------------------------------------------------------- packed triangles


def _upper_mask(n: int) -> np.ndarray:
    return np.triu(np.ones((n, n), dtype=bool))


def pack_upper(sym: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of the square ``sym``, row by row: ``n (n + 1) / 2`` values."""
    sym = np.asarray(sym)
    if sym.ndim != 2 or sym.shape[0] != sym.shape[1]:
        raise ValueError(f"pack_upper needs a square matrix, got shape {sym.shape}")
    return sym[_upper_mask(sym.shape[0])]


def unpack_upper(vec: np.ndarray, n: int) -> np.ndarray:
    """The symmetric ``(n, n)`` matrix whose packed upper triangle is ``vec`` (inverse of :func:`pack_upper`)."""
    vec = np.asarray(vec)
    expected = n * (n + 1) // 2
    if vec.shape != (expected,):
        raise ValueError(f"a packed ({n}, {n}) triangle has shape ({expected},), got {vec.shape}")
    out = np.zeros((n, n), dtype=vec.dtype)
    mask = _upper_mask(n)
    out[mask] = vec
    out.T[mask] = vec
    return out


def payload_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes on the wire: the sum of the arrays' data sizes (manifest included)."""
    return int(sum(np.asarray(array).nbytes for array in arrays))


# ----------------------------------------------------------------------------- array checks


def _where(layer: str | None, array: str) -> str:
    return f"layer {layer!r} {array}" if layer is not None else array


def _check_wire_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name not in WIRE_DTYPES:
        raise PayloadError(f"wire dtype must be one of {WIRE_DTYPES}, got {dtype.name}")
    return dtype


def _check_numeric(where: str, array: Any, dtype_name: str | None = None) -> np.ndarray:
    """``array`` if it is a float16/32/64 ndarray (of ``dtype_name`` when given), else PayloadError."""
    if not isinstance(array, np.ndarray):
        raise PayloadError(f"{where}: expected a NumPy array, got {type(array).__name__}")
    if array.dtype.name not in WIRE_DTYPES:
        raise PayloadError(f"{where}: wrong dtype {array.dtype} (allowed: {', '.join(WIRE_DTYPES)})")
    if dtype_name is not None and array.dtype.name != dtype_name:
        raise PayloadError(f"{where}: dtype {array.dtype.name} but the manifest says {dtype_name}")
    return array


def _check_array_shape(where: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise PayloadError(f"{where}: wrong shape {array.shape}, expected {shape}")


def _check_finite(where: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = array[~finite]
        raise PayloadError(
            f"{where}: {bad.size} non-finite values ({int(np.isnan(bad).sum())} NaN, {int(np.isinf(bad).sum())} Inf)"
        )


def _norm_limit(max_norm: float | Mapping[str, float] | None, array: str) -> float | None:
    if max_norm is None:
        return None
    if isinstance(max_norm, Mapping):
        limit = max_norm.get(array)
        return None if limit is None else float(limit)
    return float(max_norm)


def frobenius64(array: np.ndarray) -> float:
    """The Frobenius norm of ``array`` in float64, without overflow: ``m * ||array / m||`` with
    ``m = max |array|`` (a float32 array of entries near 1e30 has norm 1e30, not inf)."""
    values = np.asarray(array, dtype=np.float64)
    if values.size == 0:
        return 0.0
    peak = float(np.max(np.abs(values)))
    if not np.isfinite(peak) or peak == 0.0:
        return peak
    return peak * float(np.linalg.norm(values / peak))


def _check_norm(where: str, array: np.ndarray, limit: float | None) -> None:
    if limit is None:
        return
    norm = frobenius64(array)
    if not norm <= limit:
        raise PayloadError(f"{where}: absurd norm {norm:.6g} (Frobenius), above max_norm {limit:.6g}")


def _check_symmetric(where: str, kkt: np.ndarray, tol: float) -> None:
    scale = frobenius64(kkt)
    asymmetry = frobenius64(np.asarray(kkt, dtype=np.float64) - np.asarray(kkt, dtype=np.float64).T)
    if asymmetry > tol * max(scale, np.finfo(np.float64).tiny):
        raise PayloadError(
            f"{where}: not symmetric (||kkt - kkt^T|| / ||kkt|| = {asymmetry / max(scale, 1e-300):.3g} > {tol:g})"
        )


def _check_psd(where: str, kkt: np.ndarray, tol: float) -> None:
    """Reject ``kkt`` with an eigenvalue below ``-tol * max(1, trace)`` (Cholesky of the shifted matrix).

    ``trace >= ||kkt||_2`` for PSD matrices, and rounding each entry to a wire dtype with unit
    roundoff ``u`` moves the eigenvalues by at most ``u ||kkt||_F <= u trace``; callers pass
    ``tol >= eps(wire dtype)`` so rounding never fails an honest payload. One Cholesky costs
    ``n^3 / 3`` flops, far less than an eigendecomposition.
    """
    shift = tol * max(1.0, abs(float(np.trace(kkt))))
    try:
        scipy.linalg.cho_factor(kkt + shift * np.eye(kkt.shape[0]), check_finite=False)
    except np.linalg.LinAlgError:
        raise PayloadError(
            f"{where}: not positive semi-definite: it has an eigenvalue below -{shift:.3g} "
            f"(Cholesky of kkt + {shift:.3g} I failed)"
        ) from None


def validate_layer(
    layer: LayerPayload,
    spec: LayerSpec | None = None,
    *,
    max_norm: float | Mapping[str, float] | None = None,
    symmetry_tol: float = 1e-5,
    psd_tol: float | None = 1e-6,
) -> None:
    """Check one in-memory layer payload; raise :class:`PayloadError` naming the problem.

    Checks: numeric float arrays; shapes ``delta, rkt: (d_out, d_in)``, ``kkt: (d_in, d_in)``
    (against ``spec`` when given); finite values; ``kkt`` symmetric to ``symmetry_tol`` relative
    Frobenius error; ``kkt`` positive semi-definite (min eigenvalue ``>= -psd_tol * max(1, trace)``;
    ``psd_tol=None`` skips it); Frobenius norms ``<= max_norm`` (one float for every array, or a
    mapping ``{"delta": .., "kkt": .., "rkt": ..}``). ``delta`` or ``rkt`` may be None (not sent).
    """
    name = spec.name if spec is not None else None
    kkt = _check_numeric(_where(name, "kkt"), layer.kkt)
    if kkt.ndim != 2 or kkt.shape[0] != kkt.shape[1]:
        raise PayloadError(f"{_where(name, 'kkt')}: wrong shape {kkt.shape}, expected a square (d_in, d_in) matrix")
    d_in = kkt.shape[0] if spec is None else spec.d_in
    d_out = spec.d_out if spec is not None else None
    _check_array_shape(_where(name, "kkt"), kkt, (d_in, d_in))
    for array_name in ("delta", "rkt"):
        array = getattr(layer, array_name)
        if array is None:
            continue
        where = _where(name, array_name)
        _check_numeric(where, array)
        if array.ndim != 2:
            raise PayloadError(f"{where}: wrong shape {array.shape}, expected (d_out, {d_in})")
        d_out = array.shape[0] if d_out is None else d_out
        _check_array_shape(where, array, (d_out, d_in))
        _check_finite(where, array)
        _check_norm(where, array, _norm_limit(max_norm, array_name))
    _check_finite(_where(name, "kkt"), kkt)
    _check_symmetric(_where(name, "kkt"), kkt, symmetry_tol)
    _check_norm(_where(name, "kkt"), kkt, _norm_limit(max_norm, "kkt"))
    if psd_tol is not None:
        _check_psd(_where(name, "kkt"), np.asarray(kkt, dtype=np.float64), psd_tol)


# ----------------------------------------------------------------------------- manifest


def _manifest_array(manifest: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), dtype=np.uint8).copy()


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _read_manifest(arrays: Sequence[np.ndarray], fmt: str) -> dict[str, Any]:
    if arrays is None or len(arrays) == 0:
        raise PayloadError("empty reply: no arrays (expected a manifest first)")
    head = arrays[0]
    if not isinstance(head, np.ndarray) or head.dtype != np.uint8 or head.ndim != 1:
        got = f"{head.dtype} array of shape {head.shape}" if isinstance(head, np.ndarray) else type(head).__name__
        raise PayloadError(f"manifest: the first array must be a 1-D uint8 JSON manifest, got {got}")
    if head.size > MAX_MANIFEST_BYTES:
        raise PayloadError(f"manifest: {head.size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        manifest = json.loads(head.tobytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise PayloadError(f"manifest: not decodable as UTF-8 JSON (truncated or corrupt?): {error}") from None
    except RecursionError:
        raise PayloadError("manifest: JSON nested too deeply to decode") from None
    if not isinstance(manifest, dict):
        raise PayloadError(f"manifest: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != fmt:
        raise PayloadError(f"manifest: wrong format {_short_repr(manifest.get('format'))}, expected {fmt!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise PayloadError(f"manifest: unsupported version {_short_repr(manifest.get('version'))}, expected {FORMAT_VERSION}")
    if manifest.get("dtype") not in WIRE_DTYPES:
        raise PayloadError(f"manifest: wrong dtype {_short_repr(manifest.get('dtype'))}, expected one of {WIRE_DTYPES}")
    if not isinstance(manifest.get("layers"), list):
        raise PayloadError("manifest: 'layers' must be a list")
    return manifest


def _check_keys(where: str, mapping: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """A strict schema: keys beyond ``allowed`` are refused (nothing unknown is ever interpreted)."""
    extra = sorted(str(key) for key in mapping if key not in allowed)
    if extra:
        raise PayloadError(f"{where}: unexpected keys {extra} (allowed: {sorted(allowed)})")


def _short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a count of 10**309 must not flood the log)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value: Any, minimum: int) -> bool:
    """A JSON integer in ``[minimum, MAX_COUNT]`` (floats, booleans and huge integers are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_COUNT


def _read_layer_entries(manifest: Mapping[str, Any], allowed: Sequence[Sequence[str]]) -> list[tuple[LayerSpec, list[str]]]:
    """Each manifest layer as ``(LayerSpec, arrays that follow)``, checked for sane, unique entries."""
    entries = []
    seen: set[str] = set()
    for index, entry in enumerate(manifest["layers"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PayloadError(f"manifest: layers[{index}] must be an object with a string 'name'")
        name = entry["name"]
        _check_keys(f"manifest: layer {name!r}", entry, _LAYER_KEYS)
        if name in seen:
            raise PayloadError(f"manifest: layer {name!r} listed twice")
        seen.add(name)
        if not (_is_count(entry.get("d_out"), 1) and _is_count(entry.get("d_in"), 1)):
            raise PayloadError(f"manifest: layer {name!r} needs positive integer d_out and d_in (at most {MAX_COUNT}), "
                              f"got d_out={_short_repr(entry.get('d_out'))}, d_in={_short_repr(entry.get('d_in'))}")
        arrays = entry.get("arrays")
        if not isinstance(arrays, list) or list(arrays) not in [list(option) for option in allowed]:
            raise PayloadError(f"manifest: layer {name!r} lists arrays {_short_repr(arrays, 80)}; expected one of {list(map(list, allowed))}")
        entries.append((LayerSpec(name, entry["d_out"], entry["d_in"]), list(arrays)))
    return entries


def _check_expected(specs: Sequence[LayerSpec], expected: Sequence[LayerSpec] | None) -> None:
    """The reply's layer set and shapes must equal ``expected`` (order may differ)."""
    if expected is None:
        return
    got = {spec.name: spec for spec in specs}
    want = {spec.name: spec for spec in expected}
    missing = [name for name in want if name not in got]
    extra = [name for name in got if name not in want]
    if missing or extra:
        raise PayloadError(f"layer set differs from the expected one: missing layers {missing}, unexpected layers {extra}")
    for name, spec in want.items():
        if (got[name].d_out, got[name].d_in) != (spec.d_out, spec.d_in):
            raise PayloadError(
                f"layer {name!r}: shape (d_out, d_in) = ({got[name].d_out}, {got[name].d_in}) in the reply, "
                f"expected ({spec.d_out}, {spec.d_in})"
            )


def _check_count(arrays: Sequence[np.ndarray], expected: int) -> None:
    if len(arrays) != expected:
        kind = "truncated: missing" if len(arrays) < expected else "extra"
        raise PayloadError(
            f"arrays count mismatch ({kind} arrays): the manifest announces {expected} arrays including itself, "
            f"got {len(arrays)}"
        )


def _to_wire(where: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as a C-contiguous ``dtype`` array; PayloadError if it is not finite or overflows ``dtype``."""
    source = np.asarray(array)
    if source.dtype == object or not np.issubdtype(source.dtype, np.number) or np.iscomplexobj(source):
        raise PayloadError(f"{where}: cannot encode dtype {source.dtype}")
    _check_finite(where, source)
    with np.errstate(over="ignore"):
        wire = np.ascontiguousarray(source, dtype=dtype)
    if not np.isfinite(wire).all():
        raise PayloadError(f"{where}: values overflow {dtype.name} (max |value| {float(np.abs(source).max()):.6g})")
    return wire


# ----------------------------------------------------------------------------- Flower's byte tensors

_NPY_VERSIONS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_npy(tensor: Any) -> np.ndarray:
    """One ``.npy`` tensor as Flower's ``bytes_to_ndarray`` reads it, its header checked first.

    The header must be format 1.0 or 2.0, its dtype must hold no Python objects, and the data that
    follows must be exactly ``prod(shape) * itemsize`` bytes (a header announcing a huge shape over
    a few bytes is refused before anything is allocated). The array is then what
    ``np.load(allow_pickle=False)`` returns (a writable copy, C or Fortran order as sent).
    """
    if not isinstance(tensor, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(tensor).__name__}")
    stream = io.BytesIO(bytes(tensor))
    version = np.lib.format.read_magic(stream)
    reader = _NPY_VERSIONS.get(tuple(version))
    if reader is None:
        raise ValueError(f"npy format version {version} is not accepted (1.0 or 2.0)")
    shape, fortran_order, dtype = reader(stream)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects (would need pickle)")
    count = math.prod(shape)
    announced = count * dtype.itemsize
    offset = stream.tell()
    data = stream.getbuffer()
    carried = len(data) - offset
    if announced != carried:
        raise ValueError(f"the header announces shape {shape} of {dtype} ({announced} bytes of data), "
                         f"the tensor carries {carried}")
    # what np.load(allow_pickle=False) builds, without parsing the header twice
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)
    return np.array(array, copy=True, order="K")


def payload_array_names(manifest: Any, count: int) -> list[str]:
    """Names of the first ``count`` arrays of a reply by position, e.g. ``"array 2 (layer 'h.1' kkt)"``.

    ``manifest`` is the reply's first array (or None); best effort: where the manifest cannot be
    read (or says nothing about a position) the name is just ``"array i"``. Never raises.
    """
    roles: list[str] = ["manifest"]
    try:
        body = json.loads(np.asarray(manifest, dtype=np.uint8).tobytes().decode("utf-8"))
        for entry in body["layers"]:
            for array_name in entry["arrays"]:
                array_name = "kkt" if array_name == "kkt_upper" else str(array_name)
                roles.append(_where(str(entry["name"])[:80], array_name[:40]))
        if body.get("format") == PAYLOAD_FORMAT:
            roles.append("residual_norms")
    except Exception:  # noqa: BLE001 - only names: a manifest that cannot be read gives positions
        pass
    return [f"array {i} ({roles[i]})" if i < len(roles) else f"array {i}" for i in range(count)]


def decode_tensor(where: str, tensor: Any) -> np.ndarray:
    """One ``.npy`` tensor from a peer (e.g. a Message-API ``Array``'s data) as a NumPy array, its header
    checked as :func:`decode_tensors` checks each; PayloadError naming ``where`` otherwise."""
    try:
        return _load_npy(tensor)
    except Exception as error:  # noqa: BLE001 - bytes from a peer: anything can go wrong
        raise PayloadError(f"{where}: not a plain NumPy .npy array ({type(error).__name__}: {error})") from None


def decode_tensors(tensors: Any) -> list[np.ndarray]:
    """Flower's ``Parameters.tensors`` as NumPy arrays, one ``.npy`` tensor at a time (never pickle).

    A tensor that is not a plain ``.npy`` array (truncated, bad header, pickled object array, not
    bytes) raises :class:`PayloadError` naming its position and, when the manifest (the first
    array) can be read, the layer and array it stands for.
    """
    if not isinstance(tensors, (list, tuple)):
        raise PayloadError(f"parameters: tensors must be a list of bytes, got {type(tensors).__name__}")
    arrays: list[np.ndarray] = []
    for index, tensor in enumerate(tensors):
        try:
            arrays.append(_load_npy(tensor))
        except Exception as error:  # noqa: BLE001 - bytes from a client: anything can go wrong
            where = payload_array_names(arrays[0] if arrays else None, index + 1)[index]
            raise PayloadError(f"{where}: not a plain NumPy .npy array ({type(error).__name__}: {error})") from None
    return arrays


# ----------------------------------------------------------------------------- edit payloads

_PAYLOAD_ARRAY_OPTIONS = (
    ("delta", "kkt_upper", "rkt"),
    ("delta", "kkt_upper"),
    ("kkt_upper", "rkt"),
    ("kkt_upper",),
)


def encode_payload(
    payload: EditPayload,
    *,
    dtype: Any = np.float32,
    send_delta: bool = True,
    send_rkt: bool = True,
) -> list[np.ndarray]:
    """``payload`` as Flower parameters: ``[manifest, (delta, kkt_upper, rkt) per layer, residual_norms]``.

    ``send_delta`` / ``send_rkt`` drop those arrays (the manifest says which follow); ``kkt`` always
    travels, as its packed upper triangle. The payload is checked first (shapes, finite values,
    symmetric ``kkt``; :func:`validate_layer` without the PSD test) and values overflowing ``dtype``
    are refused.
    """
    dtype = _check_wire_dtype(dtype)
    n_edits = payload.n_edits
    if isinstance(n_edits, (bool, np.bool_)) or not isinstance(n_edits, (int, np.integer)) or n_edits < 0:
        raise PayloadError(f"n_edits must be a non-negative integer, got {payload.n_edits!r}")
    names = ["delta"] * bool(send_delta) + ["kkt_upper"] + ["rkt"] * bool(send_rkt)
    layers_manifest = []
    body: list[np.ndarray] = []
    for name, layer in payload.layers.items():
        validate_layer(layer, None, psd_tol=None)
        spec = LayerSpec(str(name), _d_out_of(layer), int(layer.kkt.shape[0]))
        for array_name in names:
            if array_name == "kkt_upper":
                body.append(_to_wire(_where(spec.name, "kkt"), pack_upper(layer.kkt), dtype))
                continue
            array = getattr(layer, array_name)
            if array is None:
                raise PayloadError(f"{_where(spec.name, array_name)}: asked to send it but the payload has none")
            body.append(_to_wire(_where(spec.name, array_name), array, dtype))
        layers_manifest.append({"name": spec.name, "d_out": spec.d_out, "d_in": spec.d_in, "arrays": names})
    residual_norms = np.asarray(payload.residual_norms, dtype=np.float64).reshape(-1)
    body.append(_to_wire("residual_norms", residual_norms, dtype))
    manifest = {
        "format": PAYLOAD_FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "n_edits": int(payload.n_edits),
        "residual_norms": int(residual_norms.size),
        "layers": layers_manifest,
    }
    return [_manifest_array(manifest), *body]


def decode_payload(
    arrays: Sequence[np.ndarray],
    *,
    expected: Sequence[LayerSpec] | None = None,
    max_norm: float | Mapping[str, float] | None = None,
    symmetry_tol: float = 1e-5,
    psd_tol: float | None = 1e-6,
    require: Sequence[str] = (),
    max_edits: int | None = None,
) -> EditPayload:
    """Validate and decode :func:`encode_payload`'s arrays into a float64 :class:`EditPayload`.

    Raises :class:`PayloadError` on: an empty reply; a manifest that is not JSON of this format and
    version; an arrays count differing from the manifest's (truncated or extra); arrays that are
    not float16/32/64 of the manifest's dtype (object, int, complex, bool refused); wrong shapes; a
    layer set (or shape) differing from ``expected``; NaN/Inf; ``kkt`` with an eigenvalue below
    ``-tol * max(1, trace)`` where ``tol = max(psd_tol, eps(wire dtype))`` (``psd_tol=None`` skips
    this ``O(d_in^3)`` check); a Frobenius norm above ``max_norm`` (a float for every array, or a
    mapping over ``"delta"``, ``"kkt"``, ``"rkt"``, ``"residual_norms"``); negative ``n_edits`` or
    residual norms; a layer lacking an array named in ``require`` (``"delta"``, ``"rkt"``); counts
    (``n_edits``, ``residual_norms``, ``d_out``, ``d_in``) that are not JSON integers in
    ``[0, MAX_COUNT]``; ``n_edits`` above ``max_edits`` (the server's bound on one client's edits in
    a round; None: no bound beyond ``MAX_COUNT``).

    Arrays not sent (``send_delta=False`` / ``send_rkt=False``) decode as ``None``.
    (Packed triangles are symmetric by construction, so ``symmetry_tol`` never fails here.)
    """
    manifest = _read_manifest(arrays, PAYLOAD_FORMAT)
    _check_keys("manifest", manifest, _PAYLOAD_KEYS)
    n_edits = manifest.get("n_edits")
    if not _is_count(n_edits, 0):
        raise PayloadError(f"manifest: n_edits must be a non-negative integer (at most {MAX_COUNT}), "
                           f"got {_short_repr(n_edits)}")
    if max_edits is not None and n_edits > max_edits:
        raise PayloadError(f"manifest: n_edits {n_edits} exceeds the server's bound of {max_edits} edits per client")
    n_norms = manifest.get("residual_norms")
    if not _is_count(n_norms, 0):
        raise PayloadError(f"manifest: residual_norms must be a non-negative integer count (at most {MAX_COUNT}), "
                           f"got {_short_repr(n_norms)}")
    entries = _read_layer_entries(manifest, _PAYLOAD_ARRAY_OPTIONS)
    _check_expected([spec for spec, _ in entries], expected)
    for spec, names in entries:
        for needed in require:
            if needed not in names:
                raise PayloadError(f"{_where(spec.name, needed)}: required but not sent (the layer carries {names})")
    _check_count(arrays, 1 + sum(len(names) for _, names in entries) + 1)

    wire_dtype = manifest["dtype"]
    effective_psd_tol = None if psd_tol is None else max(float(psd_tol), float(np.finfo(wire_dtype).eps))
    position = 1
    layers: dict[str, LayerPayload] = {}
    for spec, names in entries:
        decoded: dict[str, np.ndarray | None] = {"delta": None, "rkt": None}
        for array_name in names:
            where = _where(spec.name, "kkt" if array_name == "kkt_upper" else array_name)
            array = _check_numeric(where, arrays[position], wire_dtype)
            position += 1
            if array_name == "kkt_upper":
                _check_array_shape(where, array, (spec.d_in * (spec.d_in + 1) // 2,))
                _check_finite(where, array)
                decoded["kkt"] = unpack_upper(array.astype(np.float64), spec.d_in)
            else:
                _check_array_shape(where, array, (spec.d_out, spec.d_in))
                _check_finite(where, array)
                decoded[array_name] = array.astype(np.float64)
        layer = LayerPayload(delta=decoded["delta"], kkt=decoded["kkt"], rkt=decoded["rkt"])
        validate_layer(layer, spec, max_norm=max_norm, symmetry_tol=symmetry_tol, psd_tol=effective_psd_tol)
        layers[spec.name] = layer

    where = "residual_norms"
    norms = _check_numeric(where, arrays[position], wire_dtype)
    _check_array_shape(where, norms, (n_norms,))
    _check_finite(where, norms)
    if np.any(norms < 0):
        raise PayloadError(f"{where}: negative values (norms must be >= 0)")
    _check_norm(where, norms, _norm_limit(max_norm, "residual_norms"))
    return EditPayload(layers=layers, n_edits=n_edits, residual_norms=norms.astype(np.float64))


# ----------------------------------------------------------------------------- cumulative update


def encode_update(update: Mapping[str, np.ndarray], *, dtype: Any = np.float32) -> list[np.ndarray]:
    """The server's cumulative per-layer update as ``[manifest, (d_out, d_in) array per layer]``."""
    dtype = _check_wire_dtype(dtype)
    layers_manifest = []
    body = []
    for name, array in update.items():
        where = _where(str(name), "update")
        array = np.asarray(array)
        if array.ndim != 2:
            raise PayloadError(f"{where}: wrong shape {array.shape}, expected a (d_out, d_in) matrix")
        body.append(_to_wire(where, array, dtype))
        layers_manifest.append({"name": str(name), "d_out": int(array.shape[0]), "d_in": int(array.shape[1]), "arrays": ["update"]})
    manifest = {"format": UPDATE_FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "layers": layers_manifest}
    return [_manifest_array(manifest), *body]


def decode_update(
    arrays: Sequence[np.ndarray],
    *,
    expected: Sequence[LayerSpec] | None = None,
    max_norm: float | Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Validate and decode :func:`encode_update`'s arrays into ``{layer name: float64 (d_out, d_in)}``.

    Same checks as :func:`decode_payload` (manifest, count, dtype, shapes, layer set, finite,
    ``max_norm`` as a float or a mapping with key ``"update"``).
    """
    manifest = _read_manifest(arrays, UPDATE_FORMAT)
    _check_keys("manifest", manifest, _UPDATE_KEYS)
    entries = _read_layer_entries(manifest, (("update",),))
    _check_expected([spec for spec, _ in entries], expected)
    _check_count(arrays, 1 + len(entries))
    update = {}
    for position, (spec, _) in enumerate(entries, start=1):
        where = _where(spec.name, "update")
        array = _check_numeric(where, arrays[position], manifest["dtype"])
        _check_array_shape(where, array, (spec.d_out, spec.d_in))
        _check_finite(where, array)
        _check_norm(where, array, _norm_limit(max_norm, "update"))
        update[spec.name] = array.astype(np.float64)
    return update


# ----------------------------------------------------------------------------- layer-wise sub-rounds


def encode_layer_step(round_start: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray], *,
                      dtype: Any = np.float32) -> list[np.ndarray]:
    """What a client gets in sub-round ``i`` of layer-wise CollabEdit: two update blocks.

    ``round_start`` is the cumulative update at the start of the edit round (every edited layer;
    the model the clients optimise their targets on), ``merged`` this edit round's merged updates
    of the layers already done (``l_1..l_{i-1}``; empty in sub-round 0). The client edits layer
    ``l_i`` on ``W0 + round_start + merged``. Returns ``encode_update(round_start) +
    encode_update(merged)``.
    """
    return encode_update(round_start, dtype=dtype) + encode_update(merged, dtype=dtype)


def decode_layer_step(
    arrays: Sequence[np.ndarray],
    *,
    expected: Sequence[LayerSpec] | None = None,
    merged_expected: Sequence[LayerSpec] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of :func:`encode_layer_step`: ``(round_start, merged)``, each validated by :func:`decode_update`
    against ``expected`` (every edited layer) and ``merged_expected`` (the layers already merged)."""
    arrays = list(arrays)
    head = _read_manifest(arrays, UPDATE_FORMAT)
    split = 1 + len(head["layers"])
    if len(arrays) <= split:
        raise PayloadError(f"a layer-step update needs two update blocks; got {len(arrays)} arrays, "
                           f"the first block alone announces {split}")
    return (decode_update(arrays[:split], expected=expected),
            decode_update(arrays[split:], expected=merged_expected))

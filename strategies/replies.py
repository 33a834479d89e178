"""Reply handling shared by fedke's strategies: check, decode and describe what clients send.

Small functions in the style of Flower's ``strategy_utils``: :func:`decode_reply` turns a
``FitRes`` into an :class:`~fedke.payload.EditPayload` or a :class:`~fedke.codec.PayloadError`
naming what is wrong; :func:`check_fit_metrics` checks the counts a client reports;
:func:`describe_failure` makes a failure loggable without trusting its text;
:func:`weighted_metrics_average` and :func:`residual_norm_summary` summarise a round. No state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.common import Code, FitRes, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from fedke.codec import MAX_COUNT, LayerSpec, PayloadError, decode_payload, decode_tensors
from fedke.payload import EditPayload

__all__ = [
    "check_fit_metrics",
    "check_layer_arrays",
    "decode_reply",
    "describe_failure",
    "residual_norm_summary",
    "sample_clients",
    "weighted_metrics_average",
]

_MAX_REASON_CHARS = 500


def _check_layer_specs(layer_specs: Sequence[LayerSpec]) -> tuple[LayerSpec, ...]:
    specs = tuple(layer_specs)
    if not specs:
        raise ValueError("layer_specs is empty: a strategy needs at least one edited layer")
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, LayerSpec):
            raise TypeError(f"layer_specs must hold fedke.codec.LayerSpec, got {type(spec).__name__}")
        if spec.name in seen:
            raise ValueError(f"layer_specs: layer {spec.name!r} listed twice")
        seen.add(spec.name)
        for dim in (spec.d_out, spec.d_in):
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise ValueError(f"layer_specs: layer {spec.name!r} needs positive integer d_out, d_in; got {spec}")
    return specs


def _shape_of(kind: str, spec: LayerSpec) -> tuple[int, int]:
    """``"update"``: ``(d_out, d_in)``; ``"gram"``: ``(d_in, d_in)``."""
    return (spec.d_out, spec.d_in) if kind == "update" else (spec.d_in, spec.d_in)


def check_layer_arrays(
    what: str, arrays: Mapping[str, Any], specs: Sequence[LayerSpec], kind: str
) -> dict[str, np.ndarray]:
    """``arrays`` as fresh float64 copies, one per layer of ``specs``; ValueError naming ``what`` otherwise.

    Checks the layer set (exactly the names of ``specs``), real numeric dtype, the shape of
    ``kind`` (``"update"`` ``(d_out, d_in)`` or ``"gram"`` ``(d_in, d_in)``) and finite values.
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{what} must be a mapping from layer name to array, got {type(arrays).__name__}")
    names = [spec.name for spec in specs]
    missing = [name for name in names if name not in arrays]
    extra = [name for name in arrays if name not in names]
    if missing or extra:
        raise ValueError(f"{what}: layer set differs from layer_specs: missing {missing}, unexpected {extra}")
    out = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{what}[{spec.name!r}]: must be a real numeric array, got dtype {array.dtype}")
        if array.shape != _shape_of(kind, spec):
            raise ValueError(f"{what}[{spec.name!r}]: shape {array.shape}, expected {_shape_of(kind, spec)}")
        if not np.isfinite(array).all():
            raise ValueError(f"{what}[{spec.name!r}]: has non-finite values")
        out[spec.name] = np.array(array, dtype=np.float64, copy=True)
    return out


def _safe_text(value: Any, *, use_repr: bool = False) -> str:
    """``str(value)`` (or ``repr``), never raising: a client's exception whose ``__str__`` raises
    (or returns something other than a string) becomes ``<TypeName: unprintable>``."""
    try:
        text = repr(value) if use_repr else str(value)
        if isinstance(text, str):
            return text
    except Exception:  # noqa: BLE001 - anything a client hands us may misbehave when printed
        pass
    try:
        name = type(value).__name__
    except Exception:  # noqa: BLE001
        name = "object"
    return f"<{name}: unprintable>"


def _cid(client_proxy: Any) -> str:
    try:
        cid = getattr(client_proxy, "cid", client_proxy)
    except Exception:  # noqa: BLE001
        cid = client_proxy
    return _short(_safe_text(cid))


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _reason(error: BaseException) -> str:
    """A one-line reason for a rejected reply (PayloadError messages already name layer and array)."""
    if isinstance(error, PayloadError):
        return _short(_safe_text(error))
    return _short(f"{type(error).__name__}: {_safe_text(error)}")


def describe_failure(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    """One line for an entry of Flower's ``failures`` list: an exception, or a (proxy, reply) pair.

    Never raises, whatever the entry (an exception whose ``str()`` raises is named by its type).
    """
    try:
        if isinstance(failure, BaseException):
            return _short(f"{type(failure).__name__}: {_safe_text(failure)}")
        try:
            proxy, reply = failure
        except Exception:  # noqa: BLE001 - not a pair
            return _short(f"unrecognised failure entry ({type(failure).__name__}): {_safe_text(failure, use_repr=True)}")
        status = getattr(reply, "status", None)
        if status is not None:
            code = getattr(status, "code", None)
            code = getattr(code, "name", code)
            return _short(f"client {_cid(proxy)}: status {_safe_text(code)}: {_safe_text(getattr(status, 'message', ''))}")
        return _short(f"client {_cid(proxy)}: {_safe_text(reply, use_repr=True)}")
    except Exception:  # noqa: BLE001 - the last resort: a failure is always recorded
        return f"<unprintable failure of type {type(failure).__name__}>"


def sample_clients(
    client_manager: ClientManager, *, fraction: float, min_clients: int, min_available_clients: int
) -> list[ClientProxy]:
    """Flower's sampling rule: ``max(min_clients, int(fraction * available))`` clients.

    ``client_manager.sample`` first waits until ``min_available_clients`` clients have registered
    (this is what protects against node registration racing the ServerApp start), then samples
    uniformly without replacement; it returns ``[]`` when fewer clients than requested exist.
    """
    num_clients = max(int(client_manager.num_available() * fraction), min_clients)
    return client_manager.sample(num_clients=num_clients, min_num_clients=min_available_clients)


def _count(where: str, value: Any, limit: int) -> int:
    """``value`` as an int in ``[0, limit]``; PayloadError naming ``where`` otherwise.

    Integers (not booleans) qualify, and floats holding an integer (``3.0``); NaN, Inf, fractions,
    negative or huge values and other types do not.
    """
    if isinstance(value, (bool, np.bool_)):
        raise PayloadError(f"{where}: must be a non-negative integer count, got a boolean {value!r}")
    if isinstance(value, (int, np.integer)):
        count = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(float(value)) and float(value).is_integer():
        count = int(value)
    else:
        shown = _safe_text(value, use_repr=True)
        raise PayloadError(f"{where}: must be a non-negative integer count, got {type(value).__name__} "
                           f"{shown if len(shown) <= 40 else shown[:37] + '...'}")
    if not 0 <= count <= limit:
        shown = str(count) if count.bit_length() < 64 else f"an integer of {count.bit_length()} bits"
        raise PayloadError(f"{where}: must be a count in [0, {limit}], got {shown}")
    return count


#: Fit metrics the strategy reads, as counts: name -> the largest value one reply may report
#: (None: the strategy's ``max_edits_per_client``, or :data:`fedke.codec.MAX_COUNT` without one).
COUNT_METRICS: dict[str, int | None] = {"n_skipped": None, "targets_reused": 1}


def check_fit_metrics(metrics: Any, *, max_edits: int | None = None) -> dict[str, int]:
    """The counts a strategy reads from one reply's fit metrics (:data:`COUNT_METRICS`), validated.

    ``metrics`` must be a mapping (None counts as empty). ``n_skipped`` (requests the client's
    residual guard skipped) must be an integer in ``[0, max_edits or MAX_COUNT]`` and
    ``targets_reused`` (a layer-wise client that reused its targets) 0 or 1; anything else (NaN,
    Inf, fractions, negative or huge numbers, strings...) raises :class:`PayloadError` naming the
    key. Other keys are not interpreted here.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise PayloadError(f"metrics: expected a dict of scalars, got {type(metrics).__name__}")
    counts = {}
    for key, limit in COUNT_METRICS.items():
        if key in metrics:
            bound = limit if limit is not None else (MAX_COUNT if max_edits is None else int(max_edits))
            counts[key] = _count(f"metrics[{key!r}]", metrics[key], bound)
    return counts


def decode_reply(
    fit_res: FitRes,
    *,
    expected: Sequence[LayerSpec],
    max_norm: float | Mapping[str, float] | None,
    psd_tol: float | None,
    require: Sequence[str] = (),
    max_edits: int | None = None,
) -> EditPayload:
    """One client's ``FitRes`` as a validated float64 :class:`EditPayload`; PayloadError with the reason.

    A reply with a non-OK status, a ``num_examples`` that is not a non-negative integer, parameters
    whose tensors do not deserialise as plain ``.npy`` arrays (the reason names the array), or any
    failure of :func:`fedke.codec.decode_payload` (``n_edits`` above ``max_edits`` included) raises
    :class:`PayloadError`.
    """
    status = getattr(fit_res, "status", None)
    if status is not None and status.code != Code.OK:
        raise PayloadError(f"reply status {_safe_text(getattr(status.code, 'name', status.code))}: "
                           f"{_safe_text(status.message)}")
    _count("num_examples", getattr(fit_res, "num_examples", None), MAX_COUNT)
    parameters = getattr(fit_res, "parameters", None)
    if parameters is None or not hasattr(parameters, "tensors"):
        raise PayloadError(f"parameters: expected flwr Parameters, got {type(parameters).__name__}")
    arrays = decode_tensors(parameters.tensors)
    try:
        return decode_payload(arrays, expected=expected, max_norm=max_norm, psd_tol=psd_tol, require=require,
                              max_edits=max_edits)
    except PayloadError:
        raise
    except Exception as error:  # noqa: BLE001
        raise PayloadError(f"payload not decodable ({type(error).__name__}: {_safe_text(error)})") from None


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Mean of the finite values weighted by the (non-negative) weights; plain mean if they sum to 0."""
    finite = [(max(float(w), 0.0), float(v)) for w, v in pairs if math.isfinite(float(v))]
    if not finite:
        return None
    total = sum(w for w, _ in finite)
    if total > 0:
        return sum(w * v for w, v in finite) / total
    return sum(v for _, v in finite) / len(finite)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def weighted_metrics_average(pairs: Sequence[tuple[int, Mapping[str, Scalar]]]) -> dict[str, float]:
    """Every numeric metric key averaged over the clients reporting it, weighted by ``num_examples``.

    Booleans, strings and bytes are skipped; non-finite values are ignored; a key reported by only
    some clients is averaged over those. If the weights of a key sum to 0 its plain mean is used.
    """
    values: dict[str, list[tuple[float, float]]] = {}
    for num_examples, metrics in pairs:
        for key, value in (metrics or {}).items():
            if _is_number(value):
                values.setdefault(key, []).append((float(num_examples), float(value)))
    out = {}
    for key, key_pairs in values.items():
        mean = _weighted_mean(key_pairs)
        if mean is not None:
            out[key] = mean
    return out


def residual_norm_summary(norms: Sequence[np.ndarray]) -> dict[str, float]:
    """The distribution of the per-request residual norms (CollabEdit eq. 6 overlap detector):
    mean, min, 10th percentile, median, 90th percentile, max and count.

    Empty when no request reported a norm.
    """
    flat = np.concatenate([np.asarray(n, dtype=np.float64).reshape(-1) for n in norms]) if norms else np.zeros(0)
    if flat.size == 0:
        return {}
    return {
        "residual_norm_mean": float(flat.mean()),
        "residual_norm_min": float(flat.min()),
        "residual_norm_p10": float(np.percentile(flat, 10)),
        "residual_norm_median": float(np.median(flat)),
        "residual_norm_p90": float(np.percentile(flat, 90)),
        "residual_norm_max": float(flat.max()),
        "residual_norm_count": int(flat.size),
    }


def _frobenius(update: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.vdot(a, a)) for a in update.values())))


def _json_scalar(value: Any) -> Any:
    """``value`` as a plain JSON-able Python scalar (NumPy scalars unwrapped; bytes dropped to str)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value

"""The wire format of CollabEdit under secure aggregation: what a client sends through SecAgg+.

One flat layout of float arrays per client (:func:`secagg_layout`), each array kind scaled by a
PUBLIC bound so that it lies in SecAgg+'s clipping range, optionally split into two limbs
(:func:`split_limbs`); :func:`decode_secagg_sum` turns the unmasked aggregate back into summed
payloads. Pure arrays in, arrays out: the client (:mod:`fedke.simulations.client`) and the server
strategy (:mod:`fedke.strategies.secagg`, whose docstring derives the scaling and the bounds) both
import it, so neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedke.codec import LayerSpec, PayloadError, pack_upper, unpack_upper
from fedke.payload import EditPayload, LayerPayload

__all__ = [
    "SECAGG_CONFIG_KEYS",
    "SECAGG_OPTIONAL_KEYS",
    "MODULUS_RANGE",
    "SecAggBounds",
    "decode_secagg_sum",
    "default_bounds",
    "encode_secagg",
    "quantization_range_for",
    "secagg_layout",
    "split_limbs",
]

#: Fit-config keys the server sends and the clients read.
SECAGG_CONFIG_KEYS = ("secagg-kkt-bound", "secagg-rkt-bound", "secagg-stats-bound", "secagg-clip")
#: Optional fit-config keys (defaults: one limb, ``T = 2^22``).
SECAGG_OPTIONAL_KEYS = ("secagg-limbs", "secagg-quantization-range")
MODULUS_RANGE = 1 << 32


@dataclass(frozen=True)
class SecAggBounds:
    """Public per-entry bounds ``B`` of each array kind (``|x| <= B``) and the clipping range ``c``."""

    kkt: float
    rkt: float
    stats: float
    clip: float = 8.0
    #: 1: each value is quantised once; 2: a value travels as two limbs on SecAgg+'s grid (see
    #: :func:`encode_secagg`), the quantisation error drops from ``2 B / T`` to about ``2 B / T^2``.
    limbs: int = 1
    #: SecAgg+'s ``quantization_range`` ``T`` (needed by the clients for ``limbs = 2``).
    quantization_range: int = 1 << 22

    def __post_init__(self) -> None:
        for name in ("kkt", "rkt", "stats", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SecAggBounds.{name} must be a positive finite number, got {value!r}")
        if self.limbs not in (1, 2):
            raise ValueError(f"SecAggBounds.limbs must be 1 or 2, got {self.limbs!r}")
        t = self.quantization_range
        if isinstance(t, bool) or not isinstance(t, int) or t < 2 or t & (t - 1):
            raise ValueError(f"SecAggBounds.quantization_range must be a power of two >= 2, got {t!r}")

    def to_config(self) -> dict[str, float | int]:
        return {"secagg-kkt-bound": float(self.kkt), "secagg-rkt-bound": float(self.rkt),
                "secagg-stats-bound": float(self.stats), "secagg-clip": float(self.clip),
                "secagg-limbs": int(self.limbs), "secagg-quantization-range": int(self.quantization_range)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SecAggBounds":
        """The bounds a server sent in a fit config; PayloadError naming what is missing or bad."""
        missing = [key for key in SECAGG_CONFIG_KEYS if key not in config]
        if missing:
            raise PayloadError(f"secure aggregation: the fit config lacks {missing}")
        try:
            return cls(kkt=float(config["secagg-kkt-bound"]), rkt=float(config["secagg-rkt-bound"]),
                       stats=float(config["secagg-stats-bound"]), clip=float(config["secagg-clip"]),
                       limbs=int(config.get("secagg-limbs", 1)),
                       quantization_range=int(config.get("secagg-quantization-range", 1 << 22)))
        except (TypeError, ValueError) as error:
            raise PayloadError(f"secure aggregation: bad bounds in the fit config: {error}") from None


def quantization_range_for(max_clients: int, modulus_range: int = MODULUS_RANGE) -> int:
    """The largest power of two ``T <= 2^30`` with ``max_clients * T < modulus_range``.

    SecAgg+ sums ``N`` integers in ``[0, T]`` (and the weight factors, ``T`` each with ``dq = 1``)
    modulo ``modulus_range``; a sum reaching the modulus wraps around. ``2^30`` keeps Flower's
    ``int32`` quantisation from overflowing.
    """
    if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
        raise ValueError(f"max_clients must be a positive int, got {max_clients!r}")
    exponent = min(30, int(math.floor(math.log2((modulus_range - 1) / max_clients))))
    if exponent < 1:
        raise ValueError(f"{max_clients} clients cannot be summed modulo {modulus_range}")
    return 1 << exponent


def secagg_layout(specs: Sequence[LayerSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(layer, kind, shape)`` of every array in order: ``("", "stats", (2,))`` then per layer
    ``(name, "rkt", (d_out, d_in))`` and ``(name, "kkt", (d_in (d_in + 1) / 2,))``."""
    layout: list[tuple[str, str, tuple[int, ...]]] = [("", "stats", (2,))]
    for spec in specs:
        layout.append((spec.name, "rkt", (spec.d_out, spec.d_in)))
        layout.append((spec.name, "kkt", (spec.d_in * (spec.d_in + 1) // 2,)))
    return layout


def _bound_of(bounds: SecAggBounds, kind: str) -> float:
    return {"stats": bounds.stats, "rkt": bounds.rkt, "kkt": bounds.kkt}[kind]


def encode_secagg(payload: EditPayload, specs: Sequence[LayerSpec], bounds: SecAggBounds,
                  regularisers: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """A client's payload as the SecAgg+ layout, every value scaled into ``[-clip, clip]``.

    ``x -> x * clip / B`` per kind. ``rkt`` is the payload's, or ``Delta (A0 + K K^T)`` when only
    ``delta`` is present (``regularisers`` then needed). Raises PayloadError, naming the array and
    the bound it would need, when a value exceeds its bound (it would be clipped), when the layer
    set differs from ``specs``, or when a value is not finite.
    """
    names = [spec.name for spec in specs]
    if sorted(payload.layers) != sorted(names):
        raise PayloadError(f"secure aggregation: payload layers {sorted(payload.layers)} differ from {sorted(names)}")
    layers = {spec.name: spec for spec in specs}
    arrays = []
    for name, kind, shape in secagg_layout(specs):
        if kind == "stats":
            value = np.array([1.0, float(payload.n_edits)])
        else:
            layer = payload.layers[name]
            if kind == "kkt":
                value = pack_upper(np.asarray(layer.kkt, dtype=np.float64))
            else:
                value = layer.rkt
                if value is None:
                    if layer.delta is None or regularisers is None:
                        raise PayloadError(f"layer {name!r}: secure aggregation needs rkt (or delta and the regulariser)")
                    value = np.asarray(layer.delta, dtype=np.float64) @ (regularisers[name] + layer.kkt)
            value = np.asarray(value, dtype=np.float64)
            if kind == "rkt" and value.shape != (layers[name].d_out, layers[name].d_in):
                raise PayloadError(f"layer {name!r} rkt: wrong shape {value.shape}, expected {shape}")
        where = f"layer {name!r} {kind}" if name else kind
        if value.shape != shape:
            raise PayloadError(f"{where}: wrong shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise PayloadError(f"{where}: non-finite values")
        bound = _bound_of(bounds, kind)
        peak = float(np.abs(value).max()) if value.size else 0.0
        if peak > bound:
            raise PayloadError(
                f"{where}: max |value| {peak:.6g} exceeds the secure-aggregation bound {bound:.6g} "
                f"(it would be clipped); the server must raise secagg-{kind}-bound to at least {peak:.6g}"
            )
        arrays.append(value * (bounds.clip / bound))
    if bounds.limbs == 1:
        return arrays
    pairs = [split_limbs(array, bounds.clip, bounds.quantization_range) for array in arrays]
    return [hi for hi, _ in pairs] + [lo for _, lo in pairs]  # every high limb, then every low limb


def split_limbs(scaled: np.ndarray, clip: float, quantization_range: int) -> tuple[np.ndarray, np.ndarray]:
    """``scaled`` (in ``[-c, c]``) as ``(hi, lo)`` with ``scaled = hi + lo / T``, both in ``[-c, c]``.

    ``hi`` lies on SecAgg+'s quantisation grid (``-c + k h``, ``h = 2c / T``), so Flower's
    stochastic rounding leaves it unchanged (up to float rounding of ``(hi + c) / h``, which
    moves it by one step with a probability of order 1e-7); ``lo = (scaled - hi) T`` spans
    ``[-c, c]`` and is quantised with step ``h``, i.e. ``h / T`` in ``scaled``'s units.
    """
    step = 2.0 * clip / quantization_range
    hi = np.clip(np.round((scaled + clip) / step) * step - clip, -clip, clip)
    lo = np.clip((scaled - hi) * quantization_range, -clip, clip)
    return hi, lo


def decode_secagg_sum(mean: Sequence[np.ndarray], n_clients: int, specs: Sequence[LayerSpec],
                      bounds: SecAggBounds) -> tuple[EditPayload, float]:
    """The SUM payload (``rkt = S``, ``kkt = G``, ``n_edits``) from the SecAgg+ mean of ``n_clients``.

    Undoes the weighting (``x N``) and the scaling (``x B / clip``). Returns the payload and the
    per-client count read back from the stats slot (1.0 up to quantisation when the layout is
    right). PayloadError when the layout does not match ``specs``.
    """
    layout = secagg_layout(specs)
    if len(mean) != bounds.limbs * len(layout):
        raise PayloadError(f"secure aggregate: {len(mean)} arrays, expected {bounds.limbs * len(layout)} "
                           f"(the layout of {len(specs)} layers, {bounds.limbs} limb(s))")
    if bounds.limbs == 2:
        count = len(layout)
        combined = []
        for hi, lo in zip(mean[:count], mean[count:]):
            hi, lo = _float_array(hi), _float_array(lo)
            if hi.shape != lo.shape:
                raise PayloadError(f"secure aggregate: limbs of shapes {hi.shape} and {lo.shape} differ")
            combined.append(hi + lo / bounds.quantization_range)
        mean = combined
    sums: dict[tuple[str, str], np.ndarray] = {}
    for array, (name, kind, shape) in zip(mean, layout):
        array = np.asarray(array)
        where = f"layer {name!r} {kind}" if name else kind
        if array.dtype == object or not np.issubdtype(array.dtype, np.floating) or array.shape != shape:
            raise PayloadError(f"secure aggregate {where}: dtype {array.dtype} shape {array.shape}, expected float {shape}")
        if not np.isfinite(array).all():
            raise PayloadError(f"secure aggregate {where}: non-finite values")
        sums[name, kind] = array.astype(np.float64) * (n_clients * _bound_of(bounds, kind) / bounds.clip)
    stats = sums["", "stats"]
    layers = {spec.name: LayerPayload(delta=None, kkt=unpack_upper(sums[spec.name, "kkt"], spec.d_in),
                                      rkt=sums[spec.name, "rkt"]) for spec in specs}
    n_edits = max(0, int(round(float(stats[1]))))
    return EditPayload(layers=layers, n_edits=n_edits, residual_norms=np.zeros(0)), float(stats[0]) / n_clients


def _float_array(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object or not np.issubdtype(array.dtype, np.floating):
        raise PayloadError(f"secure aggregate: dtype {array.dtype}, expected float")
    return array.astype(np.float64)


def default_bounds(regularisers: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], *, lam: float,
                   max_edits: int, clip: float = 8.0, residual_factor: float = 1.0) -> SecAggBounds:
    """Public bounds from the server's knowledge (see the module docstring for the derivation).

    ``regularisers[l] = lam C_l`` ``(d_in, d_in)``; ``weights[l] = W_l`` ``(d_out, d_in)`` (``v = W k``);
    ``max_edits``: the most requests one client edits in a round.
    """
    if max_edits < 1 or lam <= 0:
        raise ValueError(f"max_edits must be >= 1 and lam > 0, got {max_edits}, {lam}")
    kkt = rkt = 0.0
    for name, regulariser in regularisers.items():
        cov = np.asarray(regulariser, dtype=np.float64) / lam
        key_sq = float(np.trace(cov))
        weight = np.asarray(weights[name], dtype=np.float64)
        out_sq = float(np.einsum("ij,jk,ik->", weight, cov, weight))  # tr(W C W^T)
        kkt = max(kkt, max_edits * key_sq)
        rkt = max(rkt, residual_factor * max_edits * math.sqrt(max(key_sq, 0.0) * max(out_sq, 0.0)))
    return SecAggBounds(kkt=kkt, rkt=rkt, stats=float(max(1, max_edits)), clip=clip)

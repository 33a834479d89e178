"""CollabEdit: the non-destructive merge of clients' MEMIT edits (Zheng et al., arXiv 2410.09508).

Lemma 1 / eq. 4 (NOTES.md section 1): with ``A = lam C`` and per-client ``Delta_i``, ``K_i K_i^T``::

    Delta_G = sum_i Delta_i (A + K_i K_i^T) (A + sum_j K_j K_j^T)^-1 = S (A + G)^-1,
    S = sum_i R_i K_i^T,  G = sum_i K_i K_i^T,

which equals Global-Edit (MEMIT on all clients' requests at once). The server needs only the two
sums, so the merger keeps running sums and never a per-client array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedke.codec import PayloadError
from fedke.merge import SingularSystemError, collab_edit_from_sums, rkt_from_delta, spd_factor
from fedke.payload import EditPayload

from .base import EditMergeStrategy, RoundMerger, check_layer_arrays

__all__ = ["CollabEdit", "check_regulariser"]


def check_regulariser(name: str, matrix: np.ndarray) -> None:
    """Refuse a regulariser ``A0 = lam C`` that is not symmetric positive definite (ValueError naming the layer).

    Symmetric to 1e-8 relative Frobenius error, and its Cholesky factorisation must succeed with a
    reciprocal condition number of at least ``d_in * eps`` (:func:`fedke.merge.spd_factor`): a
    singular or indefinite ``A0`` would make the merge ``S (A0 + G)^-1`` depend on the clients'
    keys in directions no request constrains, or fail outright.
    """
    scale = max(float(np.linalg.norm(matrix)), np.finfo(np.float64).tiny)
    if float(np.linalg.norm(matrix - matrix.T)) > 1e-8 * scale:
        raise ValueError(f"regularisers[{name!r}] must be symmetric (lam * C)")
    try:
        spd_factor(matrix, f"regularisers[{name!r}]")
    except SingularSystemError as error:
        raise ValueError(f"{error} (the regulariser lam * C of layer {name!r} must be positive definite)") from None


class CollabEdit(EditMergeStrategy):
    """CollabEdit: merge MEMIT edits exactly as if one editor had made them all.

    Implementation based on arXiv 2410.09508 (Lemma 1, eq. 4; dynamic covariance, eq. 7).

    Each round the merged update is ``Delta = S (A_t + G)^-1`` with ``S = sum_i R_i K_i^T`` and
    ``G = sum_i K_i K_i^T`` over the round's accepted payloads, solved in float64 by Cholesky
    (:func:`fedke.merge.collab_edit_from_sums`). A payload without ``R_i K_i^T`` contributes
    ``Delta_i (A0 + K_i K_i^T)`` (:func:`fedke.merge.rkt_from_delta`), which equals ``R_i K_i^T``
    when the client edited with the regulariser ``A0`` given here. Memory is
    ``O(layers x d_in^2)`` whatever the number of clients.

    Dynamic covariance (eq. 7, against forgetting over rounds): the strategy keeps
    ``kkt_total[l]``, the sum of every merged ``K K^T`` of the applied rounds. With
    ``dynamic_covariance=(beta0, beta1)`` round ``t`` solves with
    ``A_t = beta0 * A0 + beta1 * kkt_total`` (``kkt_total`` as it stood before round ``t``);
    without it ``A_t = A0``. In the sums form this is the exact Global-Edit with ``A_t`` whatever
    regulariser the clients used, since neither ``S`` nor ``G`` depends on it. (``A0`` is already
    ``lam C0``: the authors' ``beta0 = beta1 = lam`` on ``C0`` is ``(1.0, lam)`` here.)

    What crosses the wire for dynamic C: nothing beyond the usual payload. Clients edit with
    ``A0`` (they never need ``A_t``) and send ``R_i K_i^T`` (or ``Delta_i``, from which the server
    recovers ``R_i K_i^T = Delta_i (A0 + K_i K_i^T)``) and ``K_i K_i^T``; the server alone keeps
    ``kkt_total`` and solves with ``A_t``. ``kkt_total`` is part of :meth:`state_dict`, so a
    resumed run continues eq. 7 where it stopped. The delta form (``use_sums=False``) is exact for
    dynamic C too, as long as the clients edited with ``A0``.

    Singular systems: the round's ``A_t + G`` is kept symmetric positive definite reply by reply.
    A payload whose ``K K^T`` would make it fail Cholesky, or push its reciprocal condition number
    below ``d_in * eps`` (an indefinite ``K K^T`` within the codec's PSD tolerance, a huge one next
    to a small ``A_t``), is rejected with a reason naming the layer, and the other replies merge
    as if it had not been sent. This costs one Cholesky per layer and reply (as the codec's PSD
    check). Should the solve still fail at the end of the round, the round is not applied, the
    logged error names the layer and the global update is left unchanged: never a fallback.

    Parameters
    ----------
    regularisers : Mapping[str, np.ndarray]
        ``A0_l = lam * C_l`` per edited layer, ``(d_in, d_in)``, symmetric positive definite: the
        regulariser the clients edit with. Required. One that is not symmetric, whose Cholesky
        factorisation fails or that is numerically singular (reciprocal condition number below
        ``d_in * eps``) is refused with a ValueError naming the layer.
    use_sums : bool (default: True)
        True: merge from the sums ``S``, ``G`` (clients' ``rkt`` if sent, else derived from
        ``delta``). False: the delta form of Lemma 1, ``S = sum_i Delta_i (A0 + K_i K_i^T)`` from
        the deltas alone (every payload must carry ``delta``; ``rkt`` is ignored). Both give the
        same result when clients are honest and edit with ``A0``.
    dynamic_covariance : tuple[float, float] | None (default: None)
        ``(beta0, beta1)`` of eq. 7, ``beta0 > 0``, ``beta1 >= 0``; None keeps ``A_t = A0``.
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required).
    """

    _STATE_GROUPS: ClassVar[dict[str, str]] = {**EditMergeStrategy._STATE_GROUPS, "kkt_total": "gram"}

    def __init__(
        self,
        *,
        regularisers: Mapping[str, np.ndarray],
        use_sums: bool = True,
        dynamic_covariance: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.regularisers = check_layer_arrays("regularisers", regularisers, self.layer_specs, "gram")
        for name, matrix in self.regularisers.items():
            check_regulariser(name, matrix)
        self.use_sums = bool(use_sums)
        if dynamic_covariance is not None:
            try:
                beta0, beta1 = (float(beta) for beta in dynamic_covariance)
            except (TypeError, ValueError):
                raise ValueError(f"dynamic_covariance must be (beta0, beta1), got {dynamic_covariance!r}") from None
            if not (np.isfinite(beta0) and np.isfinite(beta1) and beta0 > 0 and beta1 >= 0):
                raise ValueError(f"dynamic_covariance needs finite beta0 > 0 and beta1 >= 0, got {dynamic_covariance!r}")
            dynamic_covariance = (beta0, beta1)
        self.dynamic_covariance: tuple[float, float] | None = dynamic_covariance
        #: Sum of the merged ``K K^T`` of every applied round, per layer ``(d_in, d_in)``.
        self.kkt_total: dict[str, np.ndarray] = {spec.name: np.zeros((spec.d_in, spec.d_in)) for spec in self.layer_specs}

    @property
    def required_arrays(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.use_sums else ("delta",)

    def hyperparameters(self) -> dict[str, Any]:
        settings = super().hyperparameters()
        settings["use_sums"] = self.use_sums
        settings["dynamic_covariance"] = None if self.dynamic_covariance is None else list(self.dynamic_covariance)
        return settings

    def regulariser_for_round(self) -> dict[str, np.ndarray]:
        """``A_t`` per layer for the next merge: ``A0``, or ``beta0 * A0 + beta1 * kkt_total`` (eq. 7)."""
        if self.dynamic_covariance is None:
            return dict(self.regularisers)
        beta0, beta1 = self.dynamic_covariance
        return {name: beta0 * a0 + beta1 * self.kkt_total[name] for name, a0 in self.regularisers.items()}

    def check_payload(self, payload: EditPayload) -> None:
        """With ``use_sums`` every layer needs ``rkt`` or ``delta``."""
        if not self.use_sums:
            return
        for name, layer in payload.layers.items():
            if layer.rkt is None and layer.delta is None:
                raise PayloadError(f"layer {name!r}: carries neither rkt nor delta (nothing to merge)")

    def new_merger(self) -> RoundMerger:
        return _CollabMerger(self)


class _CollabMerger(RoundMerger):
    """Running sums ``S`` and ``G`` per layer (delta form: ``sum Delta_i``, ``sum Delta_i K_iK_i^T``, ``G``).

    ``layers`` restricts the merge to those layers (default: every edited layer); :meth:`result`
    then returns only them.
    """

    def __init__(self, strategy: CollabEdit, layers: Sequence[str] | None = None) -> None:
        self.strategy = strategy
        self.client_regularisers = strategy.regularisers
        specs = [s for s in strategy.layer_specs if layers is None or s.name in layers]
        round_regularisers = strategy.regulariser_for_round()
        self.round_regularisers = {s.name: round_regularisers[s.name] for s in specs}
        self.use_sums = strategy.use_sums
        self.kkt_sum = {s.name: np.zeros((s.d_in, s.d_in)) for s in specs}
        if self.use_sums:
            self.rkt_sum = {s.name: np.zeros((s.d_out, s.d_in)) for s in specs}
        else:
            # S = (sum_i Delta_i) A0 + sum_i Delta_i K_iK_i^T, as fedke.merge.collab_sums computes it
            self.delta_sum = {s.name: np.zeros((s.d_out, s.d_in)) for s in specs}
            self.products = {s.name: np.zeros((s.d_out, s.d_in)) for s in specs}

    def add(self, payload: EditPayload, weight: float) -> None:
        """Add one payload to the sums, all layers or none.

        Every layer's new ``G + K K^T`` is checked first: ``A_t + G + K K^T`` must stay positive
        definite and not numerically singular (:func:`fedke.merge.spd_factor`); if one layer fails,
        PayloadError naming it, and the sums are left exactly as they were.
        """
        staged = {}
        for name, layer in payload.layers.items():
            kkt_sum = self.kkt_sum[name] + layer.kkt
            system = kkt_sum + self.round_regularisers[name]  # bit for bit the matrix result() factorises
            try:
                spd_factor(system, f"layer {name!r}: A_t + sum K K^T with this payload", overwrite=True)
            except SingularSystemError as error:
                raise PayloadError(f"{error}; its kkt would make the round's system unsolvable") from None
            del system
            if self.use_sums:
                rkt = layer.rkt
                if rkt is None:
                    rkt = rkt_from_delta(layer.delta, layer.kkt, self.client_regularisers[name])
                staged[name] = (kkt_sum, self.rkt_sum[name] + rkt)
            else:
                staged[name] = (kkt_sum, self.delta_sum[name] + layer.delta, self.products[name] + layer.delta @ layer.kkt)
        for name, sums in staged.items():
            self.kkt_sum[name] = sums[0]
            if self.use_sums:
                self.rkt_sum[name] = sums[1]
            else:
                self.delta_sum[name], self.products[name] = sums[1], sums[2]

    def result(self) -> dict[str, np.ndarray]:
        """``S (A_t + G)^-1`` per layer; SingularSystemError naming the layer if a system is singular."""
        merged = {}
        for name, regulariser in self.round_regularisers.items():
            if self.use_sums:
                rkt_sum = self.rkt_sum[name]
            else:
                rkt_sum = self.delta_sum[name] @ self.client_regularisers[name] + self.products[name]
            try:
                merged[name] = collab_edit_from_sums(rkt_sum, self.kkt_sum[name], regulariser)
            except SingularSystemError as error:
                raise SingularSystemError(f"layer {name!r}: the round's system A_t + sum K K^T: {error}") from None
        return merged

    def commit(self) -> None:
        for name, kkt_sum in self.kkt_sum.items():
            self.strategy.kkt_total[name] += kkt_sum

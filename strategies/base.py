"""The shared Flower strategy of fedke: validate edit payloads, merge them, keep the cumulative update.

:class:`EditMergeStrategy` is a legacy :class:`flwr.server.strategy.Strategy` (the API used with
``NumPyClient``). It is orchestration only; the maths lives in :mod:`fedke.merge` and the wire
format in :mod:`fedke.codec`. A concrete strategy supplies one thing: :meth:`new_merger`, a
:class:`RoundMerger` that is fed the round's accepted payloads one at a time and returns the
round's per-layer update. Payloads are decoded and merged one client at a time, so a strategy
that needs only running sums (CollabEdit) holds ``O(layers x d_in^2)`` whatever the number of
clients, and nothing from a round survives it except the cumulative update and a small metrics
dict.

What travels (see :mod:`fedke.codec`):

* server -> client (``FitIns`` / ``EvaluateIns``): ``encode_update(global_update)``, the
  CUMULATIVE update of every edited layer since the start (zeros in round 1). A client sets
  ``W_l = W0_l + update_l`` on its own copy of the base model; no full model ever travels.
* client -> server (``FitRes.parameters``): ``encode_payload(EditPayload)``.

The reusable pieces the class composes live beside it: reply checks and summaries in
:mod:`fedke.strategies.replies` (:func:`sample_clients`, :func:`decode_reply`,
:func:`weighted_metrics_average`, :func:`residual_norm_summary`, in the style of Flower's
``strategy_utils``) and one round's merger and aggregation in :mod:`fedke.strategies.aggregation`.

Why about 650 lines: one class carries Flower's whole legacy ``Strategy`` surface (configure /
aggregate for fit and evaluate, evaluate, state); the pieces it composes live in
:mod:`~fedke.strategies.replies` and :mod:`~fedke.strategies.aggregation`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from logging import ERROR, INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedke.codec import MAX_COUNT, LayerSpec, encode_update
from fedke.payload import EditPayload

from .aggregation import ReplyChecks, RoundAggregation, RoundMerger
from .replies import (_check_layer_specs, _cid, _frobenius, _json_scalar, _reason, _short, _weighted_mean,
                      check_fit_metrics, check_layer_arrays, decode_reply, describe_failure, residual_norm_summary,
                      sample_clients, weighted_metrics_average)

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "EditMergeStrategy",
    "ReplyChecks",
    "RoundAggregation",
    "RoundMerger",
    "check_fit_metrics",
    "decode_reply",
    "describe_failure",
    "residual_norm_summary",
    "sample_clients",
    "weighted_metrics_average",
]

STATE_FORMAT = "fedke.strategy_state"
STATE_VERSION = 1
_WIRE_DTYPES = ("float16", "float32", "float64")

EvaluateFn = Callable[[int, dict[str, np.ndarray]], "tuple[float, dict[str, Scalar]] | None"]
ConfigFn = Callable[[int], dict[str, Scalar]]
RoundEndFn = Callable[[int, dict[str, Scalar]], None]


# ----------------------------------------------------------------------------- the strategy


class EditMergeStrategy(Strategy, ABC):
    """Federated knowledge editing: merge clients' edit payloads into one cumulative update.

    Each round the sampled clients receive the cumulative update of the edited layers, edit their
    own requests on top of it and reply with an :class:`fedke.payload.EditPayload` (per layer
    ``Delta_i``, ``K_i K_i^T``, ``R_i K_i^T``). Every reply is validated before anything is
    merged; a reply that fails is rejected, logged with the client's id and the reason, and the
    rest of the round goes on. The accepted payloads are merged by the subclass's
    :class:`RoundMerger` and the result is added to :attr:`global_update`, unless it is not
    finite (then the round changes nothing and an error is logged).

    Parameters
    ----------
    layer_specs : Sequence[fedke.codec.LayerSpec]
        The edited layers: name and weight shape ``(d_out, d_in)``. Every payload must carry
        exactly these layers with these shapes. Required.
    min_fit_clients : int (default: 2)
        Minimum number of clients sampled for an edit round.
    min_evaluate_clients : int (default: 2)
        Minimum number of clients sampled for federated evaluation.
    min_available_clients : int (default: 2)
        Number of registered clients to wait for before sampling. Set it to the federation size
        when every client must take part (node registration races the ServerApp start).
    fraction_fit : float (default: 1.0)
        Fraction of available clients sampled for an edit round (at least ``min_fit_clients``).
    fraction_evaluate : float (default: 1.0)
        Fraction of available clients sampled for evaluation; 0.0 disables federated evaluation.
    max_norm : float | Mapping[str, float] | None (default: 1e6)
        Largest Frobenius norm accepted for each array of a payload (``delta``, ``kkt``, ``rkt``,
        ``residual_norms``), or a mapping over those names; None disables the check. Note that
        ``||K K^T||_F`` grows with the number of edits and the key norms: raise it, or give a
        mapping, for large models.
    wire_dtype : numpy dtype (default: np.float32)
        dtype of the cumulative update sent to clients (float16, float32 or float64). A merge whose
        result would overflow it is refused.
    on_fit_config_fn : Callable[[int], dict[str, Scalar]] | None (default: None)
        Extra config for the edit round; merged into ``{"server_round": server_round}``.
    on_evaluate_config_fn : Callable[[int], dict[str, Scalar]] | None (default: None)
        Extra config for federated evaluation; merged into ``{"server_round": server_round}``.
    evaluate_fn : Callable[[int, dict[str, np.ndarray]], tuple[float, dict[str, Scalar]] | None] | None (default: None)
        ORACLE evaluation for simulations: called by :meth:`evaluate` as
        ``evaluate_fn(server_round, update)`` with read-only views of the cumulative update. It
        runs on the server and may see every client's requests, which a real deployment cannot:
        the federated evaluation is the clients' own (``configure_evaluate`` /
        ``aggregate_evaluate``).
    on_round_end : Callable[[int, dict[str, Scalar]], None] | None (default: None)
        Called after every ``aggregate_fit`` with the round's metrics (for logging results).
    on_evaluate_end : Callable[[int, dict[str, Scalar]], None] | None (default: None)
        Called after every ``aggregate_evaluate`` with the clients' combined metrics.
    initial_update : Mapping[str, np.ndarray] | None (default: None)
        Cumulative update to start from, one ``(d_out, d_in)`` array per layer; zeros if None.
    psd_tol : float | None (default: 1e-6)
        Tolerance of the codec's positive semi-definite check of each ``K K^T`` (one Cholesky,
        ``O(d_in^3)`` per layer and client); None skips it.
    conflict_coordinator : fedke.conflict.ConflictCoordinator | None (default: None)
        Private conflict detection and resolution: it reads the opaque HMAC claims clients put in
        their fit metrics, adds ``conflict_*`` / ``overlap_*`` counts to the round's metrics and
        puts each client's decisions in that client's next fit config. It sees tokens only. A reply
        whose claims are malformed is rejected (the reason names the metrics key).
    max_edits_per_client : int | None (default: None)
        The most edit requests one client may report in one reply (its manifest's ``n_edits``, and
        its ``n_skipped`` metric): what the server knows of the round's budget, e.g.
        ``edits_per_client + conflict_pairs`` in a simulation (all of a Global-Edit round's requests,
        ``num_clients * edits_per_client + conflict_pairs``, when one client edits everything). A
        reply claiming more is rejected. ``n_edits`` is the weight of FedAvg's weighted mean, so
        without a bound one client's self-reported count decides that merge; None keeps only the
        codec's bound (:data:`fedke.codec.MAX_COUNT`, 2**53).

    Every reply is validated before it is merged: the payload (:func:`decode_reply`), the counts of
    its fit metrics (:func:`check_fit_metrics`), its conflict claims when a coordinator runs, and
    the merger's own check (CollabEdit: the round's system stays positive definite). A rejected
    reply is logged with the client's id and a reason naming the field, array or layer; nothing a
    client sends can raise out of :meth:`aggregate_fit` or change the global update except through
    an accepted payload.
    """

    #: Per-layer arrays every payload must carry (passed to ``decode_payload(require=...)``).
    required_arrays: ClassVar[tuple[str, ...]] = ()
    #: State saved by :meth:`state_dict`: attribute name -> shape kind (``"update"`` or ``"gram"``).
    _STATE_GROUPS: ClassVar[dict[str, str]] = {"global_update": "update"}

    def __init__(
        self,
        *,
        layer_specs: Sequence[LayerSpec],
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        max_norm: float | Mapping[str, float] | None = 1e6,
        wire_dtype: Any = np.float32,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: RoundEndFn | None = None,
        on_evaluate_end: RoundEndFn | None = None,
        initial_update: Mapping[str, np.ndarray] | None = None,
        psd_tol: float | None = 1e-6,
        conflict_coordinator: Any | None = None,
        max_edits_per_client: int | None = None,
    ) -> None:
        super().__init__()
        if max_edits_per_client is not None and (
            isinstance(max_edits_per_client, (bool, np.bool_))
            or not isinstance(max_edits_per_client, (int, np.integer))
            or not 0 <= max_edits_per_client <= MAX_COUNT
        ):
            raise ValueError(f"max_edits_per_client must be None or an integer in [0, {MAX_COUNT}], "
                             f"got {max_edits_per_client!r}")
        self.layer_specs: tuple[LayerSpec, ...] = _check_layer_specs(layer_specs)
        for name, value in (
            ("min_fit_clients", min_fit_clients),
            ("min_evaluate_clients", min_evaluate_clients),
            ("min_available_clients", min_available_clients),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name, value in (("fraction_fit", fraction_fit), ("fraction_evaluate", fraction_evaluate)):
            if not (0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if max_norm is not None and not isinstance(max_norm, Mapping) and not float(max_norm) > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm!r}")
        if np.dtype(wire_dtype).name not in _WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {_WIRE_DTYPES}, got {np.dtype(wire_dtype).name}")
        if min_fit_clients > min_available_clients or min_evaluate_clients > min_available_clients:
            log(
                WARNING,
                "min_available_clients (%s) is below min_fit_clients (%s) or min_evaluate_clients (%s): "
                "sampling may fail when too few clients are connected",
                min_available_clients,
                min_fit_clients,
                min_evaluate_clients,
            )
        self.min_fit_clients = int(min_fit_clients)
        self.min_evaluate_clients = int(min_evaluate_clients)
        self.min_available_clients = int(min_available_clients)
        self.fraction_fit = float(fraction_fit)
        self.fraction_evaluate = float(fraction_evaluate)
        self.max_norm = max_norm
        self.wire_dtype = np.dtype(wire_dtype)
        self.psd_tol = psd_tol
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.evaluate_fn = evaluate_fn
        self.on_round_end = on_round_end
        self.on_evaluate_end = on_evaluate_end
        self.conflict_coordinator = conflict_coordinator
        self.max_edits_per_client: int | None = None if max_edits_per_client is None else int(max_edits_per_client)

        if initial_update is None:
            self.global_update: dict[str, np.ndarray] = {
                spec.name: np.zeros((spec.d_out, spec.d_in)) for spec in self.layer_specs
            }
        else:
            self.global_update = check_layer_arrays("initial_update", initial_update, self.layer_specs, "update")
        #: Number of rounds whose merge was applied to :attr:`global_update`.
        self.rounds_merged = 0
        #: One small dict of metrics per ``aggregate_fit`` call (``server_round`` included).
        self.round_metrics: list[dict[str, Scalar]] = []
        #: ``(cid, reason)`` of every reply rejected in the last ``aggregate_fit``.
        self.last_rejections: list[tuple[str, str]] = []
        #: One line per entry of the last ``aggregate_fit``'s ``failures``.
        self.last_failures: list[str] = []

    # ------------------------------------------------------------------------- subclass API

    @abstractmethod
    def new_merger(self) -> RoundMerger:
        """A fresh :class:`RoundMerger` for one round (reads, never writes, the strategy's state)."""

    def merger_for(self, server_round: int) -> RoundMerger:
        """The merger of ``server_round`` (default: :meth:`new_merger`; a layer-wise strategy merges one layer)."""
        return self.new_merger()

    def check_payload(self, payload: EditPayload) -> None:
        """Strategy-specific checks of a decoded payload; raise PayloadError to reject it (default: none)."""

    def hyperparameters(self) -> dict[str, Any]:
        """The strategy's settings as JSON-able scalars (used by ``__repr__`` and ``state_dict``)."""
        return {
            "layers": [spec.name for spec in self.layer_specs],
            "min_fit_clients": self.min_fit_clients,
            "min_evaluate_clients": self.min_evaluate_clients,
            "min_available_clients": self.min_available_clients,
            "fraction_fit": self.fraction_fit,
            "fraction_evaluate": self.fraction_evaluate,
            "max_norm": dict(self.max_norm) if isinstance(self.max_norm, Mapping) else self.max_norm,
            "wire_dtype": self.wire_dtype.name,
            "psd_tol": self.psd_tol,
            "max_edits_per_client": self.max_edits_per_client,
        }

    @property
    def steps_per_round(self) -> int:
        """Flower server rounds per edit round (1: every server round edits and merges every layer)."""
        return 1

    def edit_round(self, server_round: int) -> int:
        """The edit round of Flower's ``server_round`` (0 for Flower's round 0, the initial evaluation)."""
        return (int(server_round) - 1) // self.steps_per_round + 1 if server_round > 0 else 0

    def ends_edit_round(self, server_round: int) -> bool:
        """True when ``server_round`` is the last server round of its edit round (then the update is complete)."""
        return server_round > 0 and int(server_round) % self.steps_per_round == 0

    def reply_specs(self, server_round: int) -> Sequence[LayerSpec]:
        """The layers every reply of ``server_round`` must carry (default: all edited layers)."""
        return self.layer_specs

    def round_labels(self, server_round: int) -> dict[str, Scalar]:
        """Extra entries of a round's metrics naming where the round stands (default: none)."""
        return {}

    # ------------------------------------------------------------------------- fedke API

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layer_specs]

    def merge(self, payloads: Sequence[EditPayload], weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """The merged update of ``payloads`` (weights default to their ``n_edits``), without applying it.

        Reads the current state (e.g. CollabEdit's dynamic regulariser) but changes nothing.
        """
        if weights is None:
            weights = [float(p.n_edits) for p in payloads]
        if len(weights) != len(payloads):
            raise ValueError(f"weights must have one entry per payload ({len(payloads)}), got {len(weights)}")
        if not payloads:
            raise ValueError("payloads is empty: nothing to merge")
        merger = self.new_merger()
        for payload, weight in zip(payloads, weights):
            self.check_payload(payload)
            merger.add(payload, float(weight))
        return merger.result()

    def update_parameters(self) -> Parameters:
        """The cumulative update as Flower ``Parameters`` (what every FitIns / EvaluateIns carries)."""
        return ndarrays_to_parameters(encode_update(self.global_update, dtype=self.wire_dtype))

    # ------------------------------------------------------------------------- Flower API

    def __repr__(self) -> str:
        settings = self.hyperparameters()
        settings["layers"] = len(self.layer_specs)
        inner = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        return f"{type(self).__name__}({inner})"

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return the sample size and the required number of available clients."""
        return max(int(num_available_clients * self.fraction_fit), self.min_fit_clients), self.min_available_clients

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return the sample size and the required number of available clients for evaluation."""
        return (
            max(int(num_available_clients * self.fraction_evaluate), self.min_evaluate_clients),
            self.min_available_clients,
        )

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial cumulative update (zeros, or ``initial_update``), encoded for the wire."""
        return self.update_parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the cumulative update of the edited layers (never a full model) to the sampled clients.

        ``parameters`` (the server's copy) is ignored: :attr:`global_update` is the source of truth.
        Config: ``{"server_round": server_round, **on_fit_config_fn(server_round)}``.
        """
        parameters = self.fit_parameters(server_round)
        clients = sample_clients(
            client_manager,
            fraction=self.fraction_fit,
            min_clients=self.min_fit_clients,
            min_available_clients=self.min_available_clients,
        )
        return [(client, FitIns(parameters, self.fit_config(server_round, _cid(client)))) for client in clients]

    def fit_parameters(self, server_round: int) -> Parameters:
        """What every client's ``FitIns`` of ``server_round`` carries: the cumulative update."""
        return self.update_parameters()

    def fit_updates(self, server_round: int) -> dict[str, Mapping[str, np.ndarray]]:
        """What every client of ``server_round`` edits on, by kind (the Message API names its arrays by
        them, :mod:`fedke.records`): ``{"update": cumulative update}``."""
        return {"update": self.global_update}

    def fit_config(self, server_round: int, cid: str | None = None) -> dict[str, Scalar]:
        """One client's fit config: ``{"server_round": ..., **on_fit_config_fn(server_round)}`` plus,
        with a conflict coordinator, the decisions about that client's own claims (sent once)."""
        config: dict[str, Scalar] = {"server_round": server_round}
        if self.on_fit_config_fn is not None:
            config.update(self.on_fit_config_fn(server_round))
        if self.conflict_coordinator is not None and cid is not None:
            config.update(self.conflict_coordinator.fit_config(cid))
        return config

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate every reply, merge the accepted ones, add the merge to the cumulative update.

        Returns the (possibly unchanged) cumulative update and the round's metrics: ``n_results``,
        ``n_accepted``, ``n_rejected``, ``n_failures``, ``n_edits`` (accepted), ``applied``,
        ``decode_seconds``, ``merge_seconds``, ``aggregate_seconds``, ``update_norm`` (Frobenius
        norm of this round's update over all layers, 0 if not applied), ``global_update_norm`` and,
        when clients reported them, ``residual_norm_mean/min/p10/median/p90/max/count``; ``n_skipped``
        (requests the clients' residual guard skipped) when reported; ``n_targets_reused`` (layer-wise
        clients that reused their edit round's targets) when reported; with a conflict coordinator,
        its ``conflict_*`` / ``overlap_*`` counts (:meth:`fedke.conflict.ConflictCoordinator.end_round`).
        """
        aggregation = self.begin_round(server_round)
        for failure in failures:
            aggregation.add_failure(failure)
        for client_proxy, fit_res in results:
            aggregation.add_reply(client_proxy, fit_res)
        return aggregation.finish()

    def begin_round(self, server_round: int, *, checks: "ReplyChecks | None" = None,
                    notify: bool = True) -> "RoundAggregation":
        """A round's aggregation fed one reply at a time (what :meth:`aggregate_fit` runs on a list).

        A streaming server loop calls :meth:`RoundAggregation.add_reply` (or ``add_failure``) as each
        reply arrives and drops it, then :meth:`RoundAggregation.finish`; the validation, the merge
        and the metrics are exactly those of :meth:`aggregate_fit` fed the same replies in the same
        order. Resets :attr:`last_failures` and :attr:`last_rejections`. ``checks``: this round's reply
        checks instead of the strategy's settings; ``notify = False``: finishing does not call
        ``on_round_end`` (a wrapper that reports the round itself).
        """
        return RoundAggregation(self, server_round, checks=checks, notify=notify)

    def _finish_round(self, aggregation: "RoundAggregation") -> tuple[Parameters | None, dict[str, Scalar]]:
        """Merge result, commit, metrics and ``on_round_end`` of a round (see :class:`RoundAggregation`)."""
        server_round = aggregation.server_round
        merger = aggregation.merger
        n_accepted = aggregation.n_accepted
        n_edits = aggregation.n_edits
        error = aggregation.error
        merge_seconds = aggregation.merge_seconds
        parameters = None
        merged: dict[str, np.ndarray] | None = None
        if error is None and n_accepted > 0:
            tic = time.perf_counter()
            try:
                merged = merger.result()
            except Exception as failure:  # noqa: BLE001
                error = f"merge failed: {_reason(failure)}"
            merge_seconds += time.perf_counter() - tic
        if merged is not None:
            candidate, problem = self._candidate(merged)
            if problem is None:
                try:
                    parameters = ndarrays_to_parameters(encode_update(candidate, dtype=self.wire_dtype))
                except Exception as failure:  # noqa: BLE001 - e.g. overflow of the wire dtype
                    problem = f"the new cumulative update cannot be encoded: {_reason(failure)}"
            if problem is None:
                self.global_update = candidate
                merger.commit()
                self.rounds_merged += 1
            else:
                error = problem
        if error is not None:
            log(ERROR, "round %s: %s; the cumulative update is left unchanged", server_round, error)
        applied = parameters is not None
        if parameters is None:
            parameters = self.update_parameters()

        metrics: dict[str, Scalar] = {
            "n_results": aggregation.n_results,
            "n_accepted": n_accepted,
            "n_rejected": len(self.last_rejections),
            "n_failures": len(self.last_failures),
            "n_edits": n_edits,
            "applied": applied,
            "decode_seconds": aggregation.decode_seconds,
            "merge_seconds": merge_seconds,
            "update_norm": _frobenius(merged) if applied and merged is not None else 0.0,
            "global_update_norm": _frobenius(self.global_update),
        }
        if error is not None:
            metrics["error"] = _short(error)
        metrics.update(residual_norm_summary(aggregation.norms))
        if aggregation.n_skipped is not None:
            metrics["n_skipped"] = aggregation.n_skipped
        if aggregation.n_targets_reused is not None:
            metrics["n_targets_reused"] = aggregation.n_targets_reused
        if self.conflict_coordinator is not None:
            metrics.update(self.conflict_coordinator.end_round(server_round))
        metrics.update(self.round_labels(server_round))
        metrics["aggregate_seconds"] = aggregation.elapsed_seconds()
        log(
            INFO,
            "round %s: %s accepted, %s rejected, %s failures, %s edits, update norm %.4g (%s)",
            server_round,
            n_accepted,
            metrics["n_rejected"],
            metrics["n_failures"],
            n_edits,
            metrics["update_norm"],
            "applied" if applied else "not applied",
        )
        self.round_metrics.append({"server_round": int(server_round), **{k: _json_scalar(v) for k, v in metrics.items()}})
        if aggregation.notify:
            self.notify_round_end(server_round, metrics)
        return parameters, metrics

    def notify_round_end(self, server_round: int, metrics: Mapping[str, Scalar]) -> None:
        """Call ``on_round_end(server_round, metrics)`` (a strategy of several server rounds per edit
        round calls it once per edit round instead)."""
        if self.on_round_end is not None:
            self.on_round_end(server_round, dict(metrics))

    def _candidate(self, merged: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
        """``global_update + merged`` as a new dict, or the reason it must not be applied."""
        if set(merged) != set(self.global_update):
            return {}, f"merge returned layers {sorted(merged)}, expected {sorted(self.global_update)}"
        candidate = {}
        for spec in self.layer_specs:
            update = np.asarray(merged[spec.name])
            if update.shape != (spec.d_out, spec.d_in):
                return {}, f"merge returned shape {update.shape} for layer {spec.name!r}, expected {(spec.d_out, spec.d_in)}"
            if not np.isfinite(update).all():
                return {}, f"merge returned non-finite values for layer {spec.name!r}"
            total = self.global_update[spec.name] + update
            if not np.isfinite(total).all():
                return {}, f"the cumulative update of layer {spec.name!r} overflows"
            candidate[spec.name] = total
        return candidate, None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Send the cumulative update to a sample of clients for federated evaluation.

        Config: ``{"server_round": server_round, **on_evaluate_config_fn(server_round)}``. Nothing
        is sent when ``fraction_evaluate`` is 0.
        """
        if self.fraction_evaluate == 0.0:
            return []
        config: dict[str, Scalar] = {"server_round": server_round}
        if self.on_evaluate_config_fn is not None:
            config.update(self.on_evaluate_config_fn(server_round))
        evaluate_ins = EvaluateIns(self.update_parameters(), config)
        clients = sample_clients(
            client_manager,
            fraction=self.fraction_evaluate,
            min_clients=self.min_evaluate_clients,
            min_available_clients=self.min_available_clients,
        )
        return [(client, evaluate_ins) for client in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Loss and every numeric metric averaged over the clients, weighted by ``num_examples``.

        Replies with a non-OK status count as failures. Adds ``n_results``, ``n_failures`` and
        ``num_examples`` (these names override clients' metrics of the same name).
        """
        n_failures = len(failures)
        for failure in failures:
            log(WARNING, "round %s: evaluation failure: %s", server_round, describe_failure(failure))
        replies = []
        for client_proxy, res in results:
            if res.status.code != Code.OK:
                n_failures += 1
                log(WARNING, "round %s: evaluation failure: %s", server_round, describe_failure((client_proxy, res)))
                continue
            replies.append(res)
        if not replies:
            return None, {"n_results": 0, "n_failures": n_failures, "num_examples": 0}
        loss = _weighted_mean([(res.num_examples, res.loss) for res in replies])
        metrics: dict[str, Scalar] = dict(weighted_metrics_average([(res.num_examples, res.metrics) for res in replies]))
        metrics.update(
            {
                "n_results": len(replies),
                "n_failures": n_failures,
                "num_examples": int(sum(res.num_examples for res in replies)),
            }
        )
        if self.on_evaluate_end is not None:
            self.on_evaluate_end(server_round, dict(metrics))
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """ORACLE evaluation for simulations: ``evaluate_fn(server_round, update)``, or None without one.

        ``update`` maps each layer to a read-only view of :attr:`global_update` (``parameters`` is
        ignored). The oracle may see every client's requests; it is not part of the federated
        protocol, whose evaluation is the clients' own.
        """
        if self.evaluate_fn is None:
            return None
        views = {}
        for name, array in self.global_update.items():
            view = array.view()
            view.flags.writeable = False
            views[name] = view
        outcome = self.evaluate_fn(server_round, views)
        if outcome is None:
            return None
        loss, metrics = outcome
        return float(loss), dict(metrics)

    # ------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state as plain NumPy arrays and JSON-able values (no pickle).

        Returns ``{"arrays": {"<group>/<layer>": float64 array}, "meta": {...}}``; groups are
        ``global_update`` (and ``kkt_total`` for CollabEdit). ``meta`` holds the format, the
        strategy's class name, the layer specs, ``rounds_merged``, ``round_metrics`` and the
        hyperparameters; it survives ``json.dumps``. Arrays are copies.
        """
        arrays = {}
        for group in self._STATE_GROUPS:
            for name, array in getattr(self, group).items():
                arrays[f"{group}/{name}"] = np.array(array, dtype=np.float64, copy=True)
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "strategy": type(self).__name__,
            "layer_specs": [[spec.name, int(spec.d_out), int(spec.d_in)] for spec in self.layer_specs],
            "rounds_merged": int(self.rounds_merged),
            "round_metrics": [dict(entry) for entry in self.round_metrics],
            "hyperparameters": self.hyperparameters(),
        }
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError (and nothing changed) if it does not fit.

        The strategy class and the layer specs must match; differing hyperparameters are logged as
        a warning (the constructor's settings are kept).
        """
        try:
            arrays, meta = state["arrays"], state["meta"]
        except (KeyError, TypeError):
            raise ValueError("state must be a mapping with 'arrays' and 'meta'") from None
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(
                f"state format {meta.get('format')!r} v{meta.get('version')!r}, expected {STATE_FORMAT!r} v{STATE_VERSION}"
            )
        if meta.get("strategy") != type(self).__name__:
            raise ValueError(f"state was saved by {meta.get('strategy')!r}, cannot load into {type(self).__name__}")
        specs = [[spec.name, spec.d_out, spec.d_in] for spec in self.layer_specs]
        if [list(entry) for entry in meta.get("layer_specs", [])] != specs:
            raise ValueError(f"state layer specs {meta.get('layer_specs')} differ from this strategy's {specs}")
        rounds_merged = meta.get("rounds_merged")
        if isinstance(rounds_merged, bool) or not isinstance(rounds_merged, int) or rounds_merged < 0:
            raise ValueError(f"state rounds_merged must be a non-negative integer, got {rounds_merged!r}")
        expected_keys = {f"{group}/{spec.name}" for group in self._STATE_GROUPS for spec in self.layer_specs}
        extra = sorted(set(arrays) - expected_keys)
        if extra:
            raise ValueError(f"state has unexpected arrays {extra}")
        staged = {}
        for group, kind in self._STATE_GROUPS.items():
            prefix = f"{group}/"
            grouped = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
            staged[group] = check_layer_arrays(f"state {group}", grouped, self.layer_specs, kind)
        saved = meta.get("hyperparameters", {})
        current = self.hyperparameters()
        differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        if differing:
            log(WARNING, "loading a state saved with different settings (%s); keeping this strategy's", ", ".join(differing))
        for group, values in staged.items():
            setattr(self, group, values)
        self.rounds_merged = rounds_merged
        self.round_metrics = [dict(entry) for entry in meta.get("round_metrics", [])]
        self.last_rejections = []
        self.last_failures = []

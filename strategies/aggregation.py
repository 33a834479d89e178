"""One round of a fedke strategy, reply by reply: the merger a strategy supplies and the round
aggregation that validates each reply, feeds the merger and keeps the round's counts.

A :class:`RoundMerger` is fed the round's accepted payloads one at a time and returns the round's
per-layer update; :class:`RoundAggregation` holds ``O(one payload)`` beyond the merger's running
sums, so a round costs the same memory whatever the number of clients (also when replies stream
in as they arrive, :mod:`fedke.simulations.streaming`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from logging import WARNING
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common import FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from fedke.codec import PayloadError, decode_payload
from fedke.payload import EditPayload

from .replies import _cid, _reason, check_fit_metrics, decode_reply, describe_failure

if TYPE_CHECKING:
    from .base import EditMergeStrategy

__all__ = ["ReplyChecks", "RoundAggregation", "RoundMerger"]


@dataclass(frozen=True)
class ReplyChecks:
    """What a round checks every reply against (:func:`fedke.codec.decode_payload`): the norm bound,
    the PSD tolerance of K K^T and the most edits one reply may carry. A strategy's own settings by
    default (:meth:`of`); a wrapper passes its own for a round (e.g. SecAgg+'s sum: a wider PSD
    tolerance, no per-client edit bound) instead of changing the strategy's."""

    max_norm: float | Mapping[str, float] | None = 1e6
    psd_tol: float | None = 1e-6
    max_edits_per_client: int | None = None

    @classmethod
    def of(cls, strategy: Any) -> "ReplyChecks":
        return cls(max_norm=strategy.max_norm, psd_tol=strategy.psd_tol,
                   max_edits_per_client=strategy.max_edits_per_client)


# ----------------------------------------------------------------------------- the merge of one round


class RoundMerger(ABC):
    """One round's merge, fed the accepted payloads one at a time.

    The strategy calls :meth:`add` once per accepted payload (already validated by the codec and
    by :meth:`EditMergeStrategy.check_payload`), then :meth:`result` once, then :meth:`commit`
    only if the result was applied to the global update. A merger must not touch the strategy's
    state before :meth:`commit`: a round that fails leaves everything as it was.
    """

    @abstractmethod
    def add(self, payload: EditPayload, weight: float) -> None:
        """Take one client's payload into the round (``weight``: its ``n_edits``).

        Raise :class:`fedke.codec.PayloadError` to refuse this payload (e.g. it would make the
        round's system singular): the merger must then be left exactly as before the call, and the
        reply is rejected like one that failed validation. Any other exception is a merge failure:
        the round is not applied.
        """

    @abstractmethod
    def result(self) -> dict[str, np.ndarray]:
        """The round's update per layer, float64 ``(d_out, d_in)``."""

    def commit(self) -> None:
        """Called once :meth:`result` has been applied; update strategy state here (default: nothing)."""


# ----------------------------------------------------------------------------- one round, reply by reply


class RoundAggregation:
    """One round of :meth:`EditMergeStrategy.aggregate_fit`, fed one reply at a time.

    Made by :meth:`EditMergeStrategy.begin_round`. :meth:`add_reply` decodes and validates one
    ``FitRes`` (a rejection is logged with the client's id and the reason and recorded in the
    strategy's ``last_rejections``), adds the accepted payload to the round's
    :class:`RoundMerger` and keeps only counts and the per-request residual norms, so the caller
    can drop the reply at once: with a running-sums merger the server holds one decoded payload
    at a time, whatever the number of clients. :meth:`add_failure` records an entry of Flower's
    ``failures`` (an exception, or a ``(proxy, FitRes)`` with a non-OK status). :meth:`finish`
    merges, commits, computes the metrics, calls ``on_round_end`` and returns what
    ``aggregate_fit`` returns. ``aggregate_fit(r, results, failures)`` is exactly
    ``begin_round(r)``, ``add_failure`` for each failure, ``add_reply`` for each result in order,
    ``finish()``.
    """

    def __init__(self, strategy: "EditMergeStrategy", server_round: int, *, checks: ReplyChecks | None = None,
                 notify: bool = True) -> None:
        self.strategy = strategy
        self.server_round = server_round
        #: What every reply of this round is checked against (default: the strategy's settings).
        self.checks = checks if checks is not None else ReplyChecks.of(strategy)
        #: Whether finishing the round calls the strategy's ``on_round_end`` (a wrapper that reports
        #: the round itself passes False).
        self.notify = notify
        strategy.last_failures = []
        strategy.last_rejections = []
        self.merger = strategy.merger_for(server_round)
        #: The layers every reply of this round must carry (:meth:`EditMergeStrategy.reply_specs`).
        self.expected = tuple(strategy.reply_specs(server_round))
        self.n_results = 0
        self.n_accepted = 0
        self.n_edits = 0
        self.norms: list[np.ndarray] = []
        self.n_skipped: int | None = None
        self.n_targets_reused: int | None = None  # layer-wise clients that reused their round's targets
        self.decode_seconds = 0.0
        self.merge_seconds = 0.0
        self.busy_seconds = 0.0  # time spent in add_* (not waiting for clients between calls)
        self._finish_started: float | None = None
        #: A merge error; once set, later replies are counted but no longer merged (the round fails).
        self.error: str | None = None
        self.finished = False

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError(f"round {self.server_round}: the aggregation is finished; begin a new round")

    def add_failure(self, failure: tuple[ClientProxy, Any] | BaseException) -> None:
        """Record one failure (as Flower's ``failures`` entries): logged, counted in ``n_failures``."""
        self._check_open()
        tic = time.perf_counter()
        line = describe_failure(failure)
        self.strategy.last_failures.append(line)
        log(WARNING, "round %s: client failure: %s", self.server_round, line)
        self.busy_seconds += time.perf_counter() - tic

    def add_reply(self, client_proxy: ClientProxy, fit_res: FitRes) -> bool:
        """Validate one reply and merge it if accepted; True if it was merged. Never raises for a bad reply."""
        self._check_open()
        started = time.perf_counter()
        try:
            return self._add_reply(client_proxy, fit_res)
        finally:
            self.busy_seconds += time.perf_counter() - started

    def add_arrays(self, cid: str, arrays: list[np.ndarray], metrics: Any = None) -> bool:
        """Validate one payload given as its wire arrays (:func:`fedke.codec.encode_payload`) and merge
        it if accepted, as :meth:`add_reply` does for a ``FitRes``; True if it was merged. For an
        aggregate that did not come in one client's reply (e.g. SecAgg+'s sum)."""
        return self.add_decoded(cid, lambda: decode_payload(arrays, **self.decode_settings()), metrics)

    def add_decoded(self, cid: str, decode: Callable[[], EditPayload], metrics: Any = None) -> bool:
        """Validate and merge one reply of another wire form: ``decode()`` returns its checked payload (e.g.
        :func:`fedke.records.payload_from_named` with :meth:`decode_settings`) or raises to reject it. The
        metrics checks, the merge and the bookkeeping are :meth:`add_reply`'s; True if it was merged."""
        self._check_open()
        started = time.perf_counter()
        try:
            return self._add(cid, decode, metrics or {})
        finally:
            self.busy_seconds += time.perf_counter() - started

    def decode_settings(self) -> dict[str, Any]:
        """The codec checks of this round's replies: ``expected`` layers, ``max_norm``, ``psd_tol``,
        ``require`` and ``max_edits`` (keyword arguments of :func:`fedke.codec.decode_payload`)."""
        checks = self.checks
        return dict(expected=self.expected, max_norm=checks.max_norm, psd_tol=checks.psd_tol,
                    require=self.strategy.required_arrays, max_edits=checks.max_edits_per_client)

    def _add_reply(self, client_proxy: ClientProxy, fit_res: FitRes) -> bool:
        return self._add(_cid(client_proxy), lambda: decode_reply(fit_res, **self.decode_settings()),
                         getattr(fit_res, "metrics", None))

    def _add(self, cid: str, decode, client_metrics: Any) -> bool:
        strategy = self.strategy
        server_round = self.server_round
        self.n_results += 1
        if self.error is not None:  # the merge already failed: the round will not be applied
            return False
        tic = time.perf_counter()
        try:
            payload = decode()
            strategy.check_payload(payload)
            counts = check_fit_metrics(client_metrics, max_edits=self.checks.max_edits_per_client)
            claims = None
            if strategy.conflict_coordinator is not None:
                claims = strategy.conflict_coordinator.read_claims(client_metrics)
        except Exception as rejection:  # noqa: BLE001 - any bad reply is rejected, never fatal
            self._reject(cid, rejection)
            return False
        finally:
            self.decode_seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        try:
            self.merger.add(payload, float(payload.n_edits))
        except PayloadError as rejection:  # the merger refused this payload and is unchanged (RoundMerger.add)
            self._reject(cid, rejection)
            return False
        except Exception as failure:  # noqa: BLE001 - a merge bug must not corrupt the state
            self.error = f"merging the payload of client {cid} failed: {_reason(failure)}"
            return False
        finally:
            self.merge_seconds += time.perf_counter() - tic
        self.n_accepted += 1
        self.n_edits += int(payload.n_edits)
        self.norms.append(payload.residual_norms)
        del payload
        if "n_skipped" in counts:
            self.n_skipped = (self.n_skipped or 0) + counts["n_skipped"]
        if "targets_reused" in counts:
            self.n_targets_reused = (self.n_targets_reused or 0) + counts["targets_reused"]
        if claims is not None:
            strategy.conflict_coordinator.record(server_round, cid, claims)
        return True

    def _reject(self, cid: str, rejection: BaseException) -> None:
        """Record and log one rejected reply (``last_rejections``: ``(cid, reason)``)."""
        reason = _reason(rejection)
        self.strategy.last_rejections.append((cid, reason))
        log(WARNING, "round %s: rejected the payload of client %s: %s", self.server_round, cid, reason)

    def elapsed_seconds(self) -> float:
        """Time spent aggregating: in ``add_*`` plus :meth:`finish` so far (waiting for clients excluded)."""
        finishing = 0.0 if self._finish_started is None else time.perf_counter() - self._finish_started
        return self.busy_seconds + finishing

    def finish(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Merge the accepted payloads, apply and commit the result, return ``(parameters, metrics)``."""
        self._check_open()
        self.finished = True
        self._finish_started = time.perf_counter()
        return self.strategy._finish_round(self)

"""fedke's strategies under Flower's Message API (``flwr.serverapp.strategy.Strategy``).

New-style ServerApps run a strategy with ``strategy.start(grid=..., initial_arrays=...,
num_rounds=...)`` and exchange ``Message``s holding ``ArrayRecord``s and ``MetricRecord``s.
:class:`MessageEditStrategy` adapts any of fedke's strategies to that API by composition: it
holds the strategy (``inner``) and speaks only its public round API (``fit_updates``,
``fit_config``, ``begin_round`` / :class:`fedke.strategies.aggregation.RoundAggregation`,
``evaluate``), so the merge maths, the validation, the reply-by-reply aggregation, the
cumulative update and the state are the legacy strategy's own, not a second copy.

Per server round, sampled nodes receive ``RecordDict({"arrays": ArrayRecord, "config":
ConfigRecord})`` with the cumulative update as named arrays (:mod:`fedke.records`:
``"<layer>/update"``, or ``"<layer>/round_start"`` and ``"<layer>/merged"`` in a layer-wise
step) and the strategy's fit config (plus Flower's ``"server-round"``). A reply carries
``"arrays"`` (``"<layer>/delta"``, ``"<layer>/kkt_upper"``, ``"<layer>/rkt"``,
``"residual_norms"``) and ``"metrics"`` (``"num-examples"`` = its ``n_edits``, and the client's
numeric metrics). Every reply is checked exactly as a legacy ``FitRes`` is; a bad one (an error
reply, a wrong serialisation, an unknown array, a failed codec check) is rejected and logged with
the node's id, and the round goes on with the others.

The classes :class:`CollabEdit`, :class:`LayerwiseCollabEdit`, :class:`FedAvg`,
:class:`TaskArithmetic` and :class:`TIES` take the legacy classes' arguments::

    from fedke.strategies.message import CollabEdit

    strategy = CollabEdit(layer_specs=specs, regularisers=regularisers)
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=3)

SecAgg+ stays on the legacy path (Flower 1.42 offers it only through the legacy workflow), and so
does HMAC conflict detection, whose claims are strings a ``MetricRecord`` cannot carry.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedke.codec import PayloadError
from fedke.records import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, named_arrays, numeric_metrics,
                           payload_from_named, to_array_record, update_to_named)

from . import collabedit, delta_merge, layerwise
from .base import EditMergeStrategy
from .replies import weighted_metrics_average

__all__ = ["CollabEdit", "FedAvg", "LayerwiseCollabEdit", "MessageEditStrategy", "TIES", "TaskArithmetic"]

log = logging.getLogger(__name__)

class MessageEditStrategy(Strategy):
    """A fedke strategy (``inner``: :class:`fedke.strategies.EditMergeStrategy`) under the Message API.

    Sampling follows the inner strategy's ``fraction_fit`` / ``min_fit_clients`` /
    ``min_available_clients`` (and ``fraction_evaluate`` / ``min_evaluate_clients`` for the
    clients' own evaluation). ``aggregate_train`` returns the cumulative update as named arrays and
    the round's metrics (those of ``aggregate_fit``, numeric ones). :meth:`oracle` is the
    ``evaluate_fn`` that ``start`` takes for the simulation's server-side evaluation.
    """

    def __init__(self, inner: EditMergeStrategy) -> None:
        if not isinstance(inner, EditMergeStrategy):
            raise TypeError(f"MessageEditStrategy wraps a fedke EditMergeStrategy, got {type(inner).__name__}")
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    @property
    def global_update(self) -> dict[str, np.ndarray]:
        """The inner strategy's cumulative update (its state lives there)."""
        return self.inner.global_update

    @property
    def steps_per_round(self) -> int:
        return self.inner.steps_per_round

    def update_record(self) -> ArrayRecord:
        """The cumulative update as named arrays (``"<layer>/update"``), in the wire dtype."""
        return to_array_record(update_to_named(self.inner.global_update, dtype=self.inner.wire_dtype))

    def initial_arrays(self) -> ArrayRecord:
        """What ``start`` begins from: the cumulative update (zeros, or the inner strategy's ``initial_update``)."""
        return self.update_record()

    def fit_record(self, server_round: int) -> ArrayRecord:
        """What every node of ``server_round`` receives: :meth:`EditMergeStrategy.fit_updates` named by kind."""
        named: dict[str, np.ndarray] = {}
        for kind, update in self.inner.fit_updates(server_round).items():
            named.update(update_to_named(update, kind=kind, dtype=self.inner.wire_dtype))
        return to_array_record(named)

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The cumulative update (never ``arrays``: the strategy's own state is the source of truth) and
        each node's fit config, to a sample of the connected nodes."""
        inner = self.inner
        if inner.fraction_fit == 0.0:
            return []
        available = len(list(grid.get_node_ids()))
        size = max(int(available * inner.fraction_fit), inner.min_fit_clients)
        node_ids, _ = sample_nodes(grid, inner.min_available_clients, size)
        record = self.fit_record(server_round)
        messages = []
        for node_id in node_ids:
            node_config = ConfigRecord({**dict(config), **inner.fit_config(server_round, str(node_id)),
                                        "server-round": server_round})
            content = RecordDict({ARRAYS_KEY: record, CONFIG_KEY: node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        log.info("round %s: edit requests sent to %d node(s) of %d", server_round, len(messages), available)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply validated and merged as it is read (:class:`RoundAggregation`), then the round finished."""
        aggregation = self.inner.begin_round(server_round)
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                aggregation.add_failure(RuntimeError(f"node {node}: error {reply.error.code}: {reply.error.reason}"))
                continue
            aggregation.add_decoded(node, lambda reply=reply: self._decode(reply, aggregation),
                                    _reply_metrics(reply))
        _, metrics = aggregation.finish()
        return self.update_record(), numeric_metrics(metrics)

    @staticmethod
    def _decode(reply: Message, aggregation: Any):
        content = reply.content
        if ARRAYS_KEY not in content.array_records:
            raise PayloadError(f"reply: no ArrayRecord {ARRAYS_KEY!r} (records: {sorted(content.keys())[:8]})")
        metrics = _reply_metrics(reply)
        return payload_from_named(named_arrays(content.array_records[ARRAYS_KEY]), n_edits=metrics.get(NUM_EXAMPLES),
                                  **aggregation.decode_settings())

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The clients' own evaluation of the cumulative update (nothing when ``fraction_evaluate`` is 0)."""
        inner = self.inner
        if inner.fraction_evaluate == 0.0:
            return []
        available = len(list(grid.get_node_ids()))
        size = max(int(available * inner.fraction_evaluate), inner.min_evaluate_clients)
        node_ids, _ = sample_nodes(grid, inner.min_available_clients, size)
        settings = {**dict(config), "server_round": server_round, "server-round": server_round}
        if inner.on_evaluate_config_fn is not None:
            settings.update(inner.on_evaluate_config_fn(server_round))
        content = RecordDict({ARRAYS_KEY: self.update_record(), CONFIG_KEY: ConfigRecord(settings)})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
                for node_id in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Every numeric metric averaged over the replies, weighted by their ``num-examples``."""
        pairs, n_failures = [], 0
        for reply in replies:
            if reply.has_error():
                n_failures += 1
                log.warning("round %s: evaluation failure: node %s: %s", server_round, reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            metrics = _reply_metrics(reply)
            weight = metrics.get(NUM_EXAMPLES, 0)
            pairs.append((weight if isinstance(weight, int) and weight >= 0 else 0, metrics))
        merged: dict[str, Any] = dict(weighted_metrics_average(pairs)) if pairs else {}
        merged.update({"n_results": len(pairs), "n_failures": n_failures,
                       NUM_EXAMPLES: int(sum(weight for weight, _ in pairs))})
        if self.inner.on_evaluate_end is not None:
            self.inner.on_evaluate_end(server_round, dict(merged))
        return numeric_metrics(merged)

    def oracle(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` for ``start``: the inner strategy's server-side (ORACLE) evaluation."""
        outcome = self.inner.evaluate(server_round, None)
        if outcome is None:
            return None
        loss, metrics = outcome
        return numeric_metrics({"loss": loss, **metrics})

    def summary(self) -> None:
        log.info("%r", self.inner)


def _reply_metrics(reply: Message) -> dict[str, Any]:
    """A reply's ``"metrics"`` record as a plain dict (empty when it has none)."""
    records = reply.content.metric_records
    return dict(records[METRICS_KEY]) if METRICS_KEY in records else {}


class CollabEdit(MessageEditStrategy):
    """CollabEdit (:class:`fedke.strategies.CollabEdit`, the same arguments) under the Message API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(collabedit.CollabEdit(**kwargs))


class LayerwiseCollabEdit(MessageEditStrategy):
    """Layer-wise CollabEdit (:class:`fedke.strategies.LayerwiseCollabEdit`) under the Message API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(layerwise.LayerwiseCollabEdit(**kwargs))


class FedAvg(MessageEditStrategy):
    """FedAvg of the clients' deltas (:class:`fedke.strategies.FedAvg`) under the Message API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(delta_merge.FedAvg(**kwargs))


class TaskArithmetic(MessageEditStrategy):
    """Task Arithmetic (:class:`fedke.strategies.TaskArithmetic`) under the Message API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(delta_merge.TaskArithmetic(**kwargs))


class TIES(MessageEditStrategy):
    """TIES merging (:class:`fedke.strategies.TIES`) under the Message API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(delta_merge.TIES(**kwargs))

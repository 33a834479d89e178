"""The same clients and strategies as ``flwr run .``, in a plain in-process loop.

No Ray, no SuperLink: each round the loop asks every client to ``fit`` on the strategy's
current update, wraps the replies as Flower ``FitRes`` and calls the strategy's own
``aggregate_fit`` and ``evaluate``. It is the reference the Flower simulation is measured
against (``bench/simulation.py``), the engine of notebook sweeps, and what tests use to check a
scenario's real result quickly.

Because a single round's client payloads do not depend on the strategy, :func:`compare_methods`
edits once and merges the same payloads with every method (Table 1 of the CollabEdit paper).

Layer-wise CollabEdit (scenario key ``layerwise``; :mod:`fedke.strategies.layerwise`) runs each
edit round as the strategy's L server rounds, one per edited layer (:func:`run_edit_round`), with
the same clients and the same ``FitIns`` (parameters and config) Flower would carry; results stay
numbered by edit round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from .client_app import make_client
from .oracle import evaluate_update
from .results import ResultsWriter, display_name
from .runtime import dealt_cases_for, testbed_for
from .scenario import Scenario
from .wiring import build_strategy

log = logging.getLogger(__name__)


class LocalProxy(ClientProxy):
    """A stand-in ClientProxy naming an in-process client (only ``cid`` is used)."""

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - never called
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


def fit_result(arrays: list[np.ndarray], num_examples: int, metrics: dict[str, Any]) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                  num_examples=num_examples, metrics=metrics)


@dataclass
class RunOutcome:
    """What :func:`run_in_process` returns."""

    scenario: Scenario
    writer: ResultsWriter
    strategy: Any
    seconds_per_round: list[float]

    @property
    def summary(self):
        return self.writer.summary()


def fit_server_round(strategy, clients: Sequence[Any], proxies: Sequence[ClientProxy], server_round: int) -> dict:
    """One Flower server round in process: every client fits on the strategy's ``FitIns`` of
    ``server_round`` (:meth:`~fedke.strategies.EditMergeStrategy.fit_parameters`, ``fit_config``), the
    strategy aggregates the replies; returns the round's merge metrics."""
    parameters = parameters_to_ndarrays(strategy.fit_parameters(server_round))
    results = []
    for proxy, client in zip(proxies, clients):
        arrays, n, metrics = client.fit(parameters, strategy.fit_config(server_round, proxy.cid))
        results.append((proxy, fit_result(arrays, n, metrics)))
    del parameters
    return strategy.aggregate_fit(server_round, results, [])[1]


def run_edit_round(strategy, clients: Sequence[Any], proxies: Sequence[ClientProxy], edit_round: int) -> list[dict]:
    """Every server round of ``edit_round`` (one, or one per edited layer for layer-wise CollabEdit);
    returns their merge metrics. The strategy's update is complete afterwards."""
    steps = strategy.steps_per_round
    return [fit_server_round(strategy, clients, proxies, server_round)
            for server_round in range((edit_round - 1) * steps + 1, edit_round * steps + 1)]


def run_in_process(scenario: Scenario, *, output_dir: str | None = None, write: bool = True,
                   evaluate: bool = True) -> RunOutcome:
    """Run ``scenario`` edit round by edit round in this process; returns the results and the strategy."""
    writer = ResultsWriter(output_dir or scenario.output_dir, config=scenario.to_run_config(), method=scenario.strategy)
    strategy = build_strategy(scenario, evaluate=False, writer=writer, wait_for_clients=False)
    clients = [make_client(scenario, cid) for cid in range(scenario.effective_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    seconds = []
    for edit_round in range(1, scenario.num_rounds + 1):
        started = time.perf_counter()
        run_edit_round(strategy, clients, proxies, edit_round)
        seconds.append(time.perf_counter() - started)
        log.info("round %d/%d merged in %.1f s", edit_round, scenario.num_rounds, seconds[-1])
        if evaluate:
            metrics = evaluate_update(scenario, strategy.global_update, edit_round)
            writer.record(edit_round, metrics)
    if write:
        writer.write()
    return RunOutcome(scenario, writer, strategy, seconds)


def layerwise_collab(scenario: Scenario, clients: Sequence[Any] | None = None):
    """Layer-wise CollabEdit of the scenario's first edit round through the Flower strategy
    (:class:`fedke.strategies.LayerwiseCollabEdit`) and ``clients`` (default: the scenario's);
    returns ``(strategy, seconds)``. Clients keep their targets in their ``state`` between steps, so
    clients that already ran this round (or share its state) reuse them."""
    layered = replace(scenario, strategy="collabedit", layerwise="true")
    strategy = build_strategy(layered, evaluate=False, wait_for_clients=False)
    if clients is None:
        clients = [make_client(layered, cid) for cid in range(layered.num_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    started = time.perf_counter()
    run_edit_round(strategy, clients, proxies, 1)
    return strategy, time.perf_counter() - started


@dataclass
class Comparison:
    """What :func:`compare_methods` returns: the metrics and each method's merged update."""

    writer: ResultsWriter
    updates: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]
    replies: list = field(default_factory=list)  # the clients' one-shot (proxy, FitRes), to merge again
    clients: list = field(default_factory=list)  # the EditClients (their state holds layer-wise targets)

    @property
    def summary(self):
        return self.writer.summary()


def compare_methods(scenario: Scenario, methods: Sequence[str] = ("collabedit", "fedavg", "task_arithmetic", "ties"),
                    *, include_global: bool = True, include_unedited: bool = True) -> Comparison:
    """One round, the same edits, merged by every method; Global-Edit edits all requests at once.

    ``summary`` of the result is the paper's Table 1 on the world; ``updates`` holds each
    method's merged update (to compare CollabEdit with Global-Edit exactly). When the scenario
    runs CollabEdit layer-wise (``layerwise``; ``"auto"`` with ``editor-mode = "sequential"``),
    ``"CollabEdit"`` is layer-wise CollabEdit through its Flower strategy and the same clients
    (:func:`layerwise_collab`; its ``seconds`` entry covers the clients' sub-rounds too) and the
    one-shot merge of the clients' sequential payloads is ``"CollabEdit (one-shot)"``.
    """
    if scenario.num_rounds != 1:
        raise ValueError("compare_methods runs single-round scenarios (num-rounds = 1)")
    writer = ResultsWriter(scenario.output_dir, config=scenario.to_run_config())
    bed = testbed_for(scenario)
    cases = [case for cs in dealt_cases_for(scenario).values() for case in cs]
    if include_unedited:
        writer.record(1, evaluate_update(scenario, {}, 1, cases), method="Unedited")
    base = replace(scenario, strategy="collabedit")
    layerwise = base.layerwise_enabled and "collabedit" in methods
    clients = [make_client(base, cid) for cid in range(base.num_clients)]
    started = time.perf_counter()
    replies = []
    for i, client in enumerate(clients):
        replies.append((LocalProxy(str(i)), fit_result(*client.fit([], {"server_round": 1}))))
        log.info("client %d/%d edited (%.1f s so far)", i + 1, len(clients), time.perf_counter() - started)
    seconds = {"client_edits": time.perf_counter() - started}
    log.info("%d clients edited in %.1f s", len(clients), seconds["client_edits"])
    updates: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        label = ONE_SHOT_LABEL if layerwise and method == "collabedit" else display_name(method)
        # the merge alone: its strategy does not depend on passes (the replies carry the clients' passes)
        strategy = build_strategy(replace(scenario, strategy=method, layerwise="false", passes=1), evaluate=False,
                                  wait_for_clients=False)
        started = time.perf_counter()
        strategy.aggregate_fit(1, replies, [])
        seconds[label] = time.perf_counter() - started
        updates[label] = {k: v.copy() for k, v in strategy.global_update.items()}
        writer.record(1, evaluate_update(scenario, strategy.global_update, 1, cases), method=label)
    if layerwise:
        strategy, seconds["CollabEdit"] = layerwise_collab(base, clients)
        updates["CollabEdit"] = {k: v.copy() for k, v in strategy.global_update.items()}
        writer.record(1, evaluate_update(scenario, strategy.global_update, 1, cases), method="CollabEdit")
    if include_global:
        editor = bed.editor(**scenario.memit_overrides())
        log.info("Global-Edit: %d requests in one edit", len(cases))
        started = time.perf_counter()
        payload = editor.edit([case.request for case in cases], progress=log.isEnabledFor(logging.INFO))
        seconds["GlobalEdit"] = time.perf_counter() - started
        updates["GlobalEdit"] = payload.deltas()
        writer.record(1, evaluate_update(scenario, payload.deltas(), 1, cases), method="GlobalEdit")
    return Comparison(writer, updates, seconds, replies, clients)


#: The method name of one-shot CollabEdit in :func:`compare_methods` when CollabEdit runs layer-wise.
ONE_SHOT_LABEL = "CollabEdit (one-shot)"


def sweep_clients(base: Scenario, client_counts: Iterable[int], *, total_edits: int | None = None,
                  methods: Sequence[str] = ("collabedit", "fedavg", "task_arithmetic", "ties")):
    """Score against N (CollabEdit Figure 6): fixed ``total_edits`` split over N clients when
    given, else fixed ``edits_per_client``. Returns a tidy DataFrame (n_clients, method, metric, value)."""
    import pandas as pd

    frames = []
    for n in client_counts:
        per_client = base.edits_per_client if total_edits is None else max(1, total_edits // n)
        scenario = replace(base, num_clients=n, edits_per_client=per_client)
        table = compare_methods(scenario, methods, include_global=False, include_unedited=False).writer.table()
        table["n_clients"] = n
        table["edits_per_client"] = per_client
        frames.append(table)
    return pd.concat(frames, ignore_index=True)

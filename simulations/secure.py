"""CollabEdit under secure aggregation, in process: the numbers of SecAgg+ without its cryptography.

:func:`secagg_results` turns the clients' SecAgg+ replies into what ``SecAggPlusWorkflow`` hands
the strategy (:func:`fedke.strategies.secagg.simulate_secagg_mean`: Flower's own clipping,
stochastic quantisation, modular sum and dequantisation; the masks cancel exactly and are left
out). :func:`compare_secagg` edits once and merges the same payloads with plain CollabEdit and with
CollabEdit over SecAgg+, to measure what quantisation costs (bench/privacy.py, tests). A real
SecAgg+ run goes through ``flwr run`` with ``secure-aggregation = true``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedke.codec import decode_payload
from fedke.merge import relative_update_error
from fedke.payload import EditPayload
from fedke.strategies.secagg import CollabEditSecAgg, encode_secagg, simulate_secagg_mean

from .client_app import make_client
from .inprocess import LocalProxy, fit_result
from .oracle import evaluate_update
from .runtime import dealt_cases_for
from .scenario import Scenario
from .wiring import build_strategy

__all__ = ["SecAggComparison", "compare_secagg", "secagg_results"]


def secagg_results(strategy: CollabEditSecAgg, payloads: Sequence[EditPayload]) -> list[tuple[LocalProxy, FitRes]]:
    """The ``results`` SecAgg+ would give ``strategy.aggregate_fit`` for these clients' payloads."""
    client_arrays = [encode_secagg(payload, strategy.layer_specs, strategy.bounds) for payload in payloads]
    mean = simulate_secagg_mean(client_arrays, clip=strategy.bounds.clip,
                                quantization_range=strategy.quantization_range)
    parameters = ndarrays_to_parameters(mean)
    return [(LocalProxy(str(i)), FitRes(Status(Code.OK, ""), parameters, 1, {})) for i in range(len(payloads))]


@dataclass
class SecAggComparison:
    """Plain CollabEdit vs CollabEdit over (simulated) SecAgg+ on the same payloads, one round."""

    rel_error: float
    metrics_plain: dict[str, float]
    metrics_secagg: dict[str, float]
    seconds: dict[str, float]
    update_plain: dict[str, np.ndarray]
    update_secagg: dict[str, np.ndarray]
    strategy: Any

    @property
    def score_plain(self) -> float:
        return float(self.metrics_plain.get("Score", float("nan")))

    @property
    def score_secagg(self) -> float:
        return float(self.metrics_secagg.get("Score", float("nan")))


def compare_secagg(scenario: Scenario, *, evaluate: bool = True) -> SecAggComparison:
    """Round 1 of ``scenario`` (CollabEdit): every client edits once; merge plainly and under SecAgg+.

    ``rel_error`` is the relative Frobenius error of the SecAgg+ update against plain CollabEdit;
    ``seconds`` holds the client edits, the plain merge and the SecAgg+ path (scaling, simulated
    quantised sum, recovery and merge).
    """
    plain_scenario = replace(scenario, strategy="collabedit", secure_aggregation=False, num_rounds=1)
    secure_scenario = replace(plain_scenario, secure_aggregation=True)
    clients = [make_client(plain_scenario, cid) for cid in range(plain_scenario.num_clients)]
    started = time.perf_counter()
    replies = [(LocalProxy(str(i)), fit_result(*client.fit([], {"server_round": 1}))) for i, client in enumerate(clients)]
    seconds = {"client_edits": time.perf_counter() - started}

    plain = build_strategy(plain_scenario, evaluate=False, wait_for_clients=False)
    started = time.perf_counter()
    plain.aggregate_fit(1, replies, [])
    seconds["plain_merge"] = time.perf_counter() - started

    secure = build_strategy(secure_scenario, evaluate=False, wait_for_clients=False)
    from flwr.common import parameters_to_ndarrays

    payloads = [decode_payload(parameters_to_ndarrays(res.parameters)) for _, res in replies]
    started = time.perf_counter()
    _, metrics = secure.aggregate_fit(1, secagg_results(secure, payloads), [])
    seconds["secagg_merge"] = time.perf_counter() - started
    if not metrics.get("applied"):
        raise RuntimeError(f"the secure aggregate was not applied: {metrics.get('error')}")

    update_plain = {k: v.copy() for k, v in plain.global_update.items()}
    update_secagg = {k: v.copy() for k, v in secure.global_update.items()}
    metrics_plain = metrics_secagg = {}
    if evaluate:
        cases = [case for (_, r), cs in sorted(dealt_cases_for(plain_scenario).items()) if r == 1 for case in cs]
        metrics_plain = evaluate_update(plain_scenario, update_plain, 1, cases)
        metrics_secagg = evaluate_update(plain_scenario, update_secagg, 1, cases)
    return SecAggComparison(relative_update_error(update_secagg, update_plain), metrics_plain, metrics_secagg,
                            seconds, update_plain, update_secagg, secure)

"""The ORACLE: what a simulation can measure and a deployment cannot (every client's requests).

Request sets per round (``all``; with ``forgetting``: ``old``, ``new-<i>``, ``new-all``, see
:mod:`fedke.simulations.multiround`), their batched evaluation on the global model, and the
server-side ``evaluate_fn`` the ServerApp and the in-process drivers share. Imports only the
scenario, the runtime caches and the results writer: every app and driver imports it downward.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from fedke.editing.weights import applied_update
from fedke.eval import aggregate, evaluate_cases

from .results import ResultsWriter
from .runtime import dealt_cases_for, testbed_for
from .scenario import Scenario

log = logging.getLogger(__name__)

OLD_SET = "old"
NEW_ALL = "new-all"


def new_set_name(server_round: int) -> str:
    """The request-set name of the cases edited in Flower round ``server_round >= 2``: ``new-<round - 1>``."""
    return f"new-{server_round - 1}"


def round_cases(scenario: Scenario, server_round: int) -> list:
    """Every client's cases of Flower round ``server_round``."""
    dealt = dealt_cases_for(scenario)
    return [case for (_, r), cases in sorted(dealt.items()) if r == server_round for case in cases]


def request_sets(scenario: Scenario, server_round: int) -> dict[str, list]:
    """The request sets measured after ``server_round`` (see the module docstring), name -> cases."""
    if not scenario.forgetting:
        dealt = dealt_cases_for(scenario)
        return {"all": [case for (_, r), cases in sorted(dealt.items()) if r <= server_round for case in cases]}
    sets = {OLD_SET: round_cases(scenario, 1)}
    final = server_round == scenario.num_rounds
    rounds = range(2, server_round + 1) if final else ([server_round] if server_round > 1 else [])
    for r in rounds:
        sets[new_set_name(r)] = round_cases(scenario, r)
    if final and scenario.num_rounds > 1:
        sets[NEW_ALL] = [case for r in range(2, scenario.num_rounds + 1) for case in sets[new_set_name(r)]]
    return sets


def evaluate_round(scenario: Scenario, update: Mapping[str, np.ndarray], server_round: int) -> dict[str, dict[str, float]]:
    """Metrics (x100) of every request set of ``server_round`` on the model with ``update`` applied.

    The distinct cases of all sets are scored in one batched call; each set's metrics aggregate
    its own cases' rows (:func:`fedke.eval.aggregate`).
    """
    sets = request_sets(scenario, server_round)
    unique = {}
    for cases in sets.values():
        for case in cases:
            unique.setdefault(case.case_id, case)
    if not unique:
        return {}
    bed = testbed_for(scenario)
    with applied_update(bed.model, update):
        per_case = evaluate_cases(bed.model, bed.tokenizer, list(unique.values())).per_case
    per_case = per_case.set_index("case_id", drop=False)
    return {name: {k: float(v) for k, v in aggregate(per_case.loc[[c.case_id for c in cases]]).items()}
            for name, cases in sets.items() if cases}


def evaluate_update(scenario: Scenario, update, server_round: int, cases=None) -> dict[str, float]:
    """Metrics of the world model with ``update`` applied, on ``cases`` (default: every case
    edited up to ``server_round``, all clients' — an oracle only a simulation has)."""
    bed = testbed_for(scenario)
    if cases is None:
        dealt = dealt_cases_for(scenario)
        cases = [case for (_, r), cs in sorted(dealt.items()) if r <= server_round for case in cs]
    with applied_update(bed.model, update):
        return {k: float(v) for k, v in evaluate_cases(bed.model, bed.tokenizer, cases).summary.items()}


def oracle_evaluate_fn(scenario: Scenario, writer: ResultsWriter | None):
    """ORACLE: evaluate the global model on every request edited so far (all clients' requests)."""

    def evaluate(server_round: int, update):
        if server_round == 0:
            return None
        if scenario.forgetting:  # the old set every round, each new set at its round and the end
            by_set = evaluate_round(scenario, update, server_round)
            metrics = by_set[OLD_SET]
        else:
            by_set = {"all": evaluate_update(scenario, update, server_round)}
            metrics = by_set["all"]
        log.info("round %d: %s", server_round, " ".join(f"{k}={v:.1f}" for k, v in metrics.items()))
        if writer is not None:
            for name, values in by_set.items():
                writer.record(server_round, values, request_set=name)
            writer.write()
            if server_round == scenario.num_rounds:
                writer.print_summary(f"fedke {scenario.strategy}: {scenario.effective_clients} client(s) x "
                                     f"{scenario.effective_edits_per_client} edits, {scenario.num_rounds} round(s)")
        return 1.0 - metrics.get("Score", 0.0) / 100.0, metrics

    return evaluate

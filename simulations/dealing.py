"""Dealing a scenario's edit requests to its clients and rounds: the seeded partition (``iid`` or by
relation), the forgetting setting's old and new sets, and the injected conflicting twins.

Pure functions of a :class:`~fedke.simulations.scenario.Scenario` and a world or fact set: every
process deals the same requests to the same partition ids (which is what lets a Flower run equal
its in-process reference).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from fedke.data.factset import FactSet
from fedke.data.records import EditCase
from fedke.data.world import World

from .scenario import ConfigError, Scenario

__all__ = ["deal_cases", "forgetting_cases", "inject_conflicts"]


def deal_cases(scenario: Scenario, world: "World | FactSet") -> dict[tuple[int, int], list[EditCase]]:
    """(client, round) -> that client's edit cases for that round; no (subject, relation) twice.

    The same scenario deals the same cases to the same clients, in every process. ``"iid"``
    deals a shuffled stream; ``"relation"`` sorts each round's pool by relation first, so each
    client's requests come from one or two relations (non-IID). Global-Edit gets the same
    requests as the federated strategies, all in client 0.
    """
    per_round = scenario.num_clients * scenario.edits_per_client
    if scenario.forgetting:
        cases = forgetting_cases(scenario, world)
    else:
        cases = world.edit_cases(scenario.total_edits, seed=scenario.seed)
    rng = random.Random(f"deal/{scenario.seed}")
    dealt: dict[tuple[int, int], list[EditCase]] = {}
    for round_index in range(scenario.num_rounds):
        pool = cases[round_index * per_round:(round_index + 1) * per_round]
        if scenario.partitioning == "relation":
            pool = sorted(pool, key=lambda c: (c.relation_id, rng.random()))
        server_round = round_index + 1
        if scenario.is_global:
            dealt[0, server_round] = list(pool)
            continue
        for client in range(scenario.num_clients):
            dealt[client, server_round] = pool[client * scenario.edits_per_client:(client + 1) * scenario.edits_per_client]
    if scenario.conflict_pairs:
        dealt = inject_conflicts(scenario, world, dealt)
    return dealt


def forgetting_cases(scenario: Scenario, world: "World | FactSet") -> list[EditCase]:
    """The cases of a forgetting scenario, in round order: the old set E_o, then E_n1, E_n2, ...

    E_o (``num-clients x edits-per-client`` cases) comes from ``old-relations`` relations drawn
    with the seed, of cases with neighbourhood prompts (so that every metric of E_o is defined on a
    real-fact set); every later case has a relation outside those AND a subject outside E_o's, so
    old and new requests are unrelated (CollabEdit section 3.3.2). Case ids are unique.
    """
    rng = random.Random(f"forgetting/{scenario.seed}")
    scorable = _pairs_with_neighbourhood(world)
    scorable_relations = None if scorable is None else {relation_id for _, relation_id in scorable}
    relation_ids = [relation.relation_id for relation in world.relations
                    if scorable_relations is None or relation.relation_id in scorable_relations]
    old_relations = set(rng.sample(relation_ids, scenario.old_relations))
    pairs = list(world.fact_pairs())
    rng.shuffle(pairs)
    per_round = scenario.num_clients * scenario.edits_per_client
    old = [pair for pair in pairs if pair[1] in old_relations and (scorable is None or pair in scorable)][:per_round]
    old_subjects = {subject for subject, _ in old}
    fresh = [pair for pair in pairs if pair[1] not in old_relations and pair[0] not in old_subjects]
    fresh = fresh[:per_round * (scenario.num_rounds - 1)]
    if len(old) < per_round or len(fresh) < per_round * (scenario.num_rounds - 1):
        raise ConfigError(f"{getattr(world, 'name', None) or world.config} is too small for the forgetting scenario: "
                          f"{len(old)} old and {len(fresh)} unrelated new (subject, relation) pairs available")
    return [world.edit_case(subject, relation_id, rng=rng, case_id=i)
            for i, (subject, relation_id) in enumerate(old + fresh)]


def _pairs_with_neighbourhood(world: "World | FactSet") -> set[tuple[str, str]] | None:
    """The (subject, relation) pairs of a fact set whose cases have neighbourhood prompts (NS and NA
    are undefined without them: a real relation whose objects are unique, such as capitals, has
    none); None for the synthetic world, whose cases all have them."""
    cases = getattr(world, "cases", None)
    if cases is None:
        return None
    return {(case.subject, case.relation_id) for case in cases if case.neighborhood_prompts}


def inject_conflicts(scenario: Scenario, world: "World | FactSet",
                     dealt: dict[tuple[int, int], list[EditCase]]) -> dict[tuple[int, int], list[EditCase]]:
    """Knowledge conflicts (CollabEdit 3.3.1, Table 7): ``conflict-pairs`` cases per round get a twin
    E' with the same subject and relation and a different new object (neither the case's nor the
    true one), sent in the same round by the next client (``"cross-client"``) or by the same
    client (``"same-client"``; always so with one client).

    The cases picked are the first of each client in turn (client 0's first, client 1's first,
    ...). Every case of the round gets ``extra["timestamp"]`` (round index + a seeded fraction:
    when the request was made, for FCFS); each case of a pair names the other in
    ``extra["conflicts_with"]`` (ground truth for benchmarks; clients never send it). A twin keeps
    the case's prompt, paraphrases and neighbourhood prompts (as the paper's generated conflict
    objects do); its case id is the original's with ``"'"`` appended.
    """
    rng = random.Random(f"conflict/{scenario.seed}")
    out = {key: list(cases) for key, cases in dealt.items()}
    clients = sorted({client for client, _ in out})
    for server_round in sorted({r for _, r in out}):
        for client in clients:
            out[client, server_round] = [_stamped(case, server_round - 1 + rng.random())
                                         for case in out.get((client, server_round), [])]
        order = [(client, j) for j in range(max(len(out[c, server_round]) for c in clients)) for client in clients
                 if j < len(out[client, server_round])]
        twins: dict[int, list[EditCase]] = {}
        for client, j in order[:scenario.conflict_pairs]:
            case = out[client, server_round][j]
            relation = world.relation_by_id[case.relation_id]
            choices = [o for o in relation.objects if o not in (case.request.target_new, case.request.target_true)]
            twin_id = f"{case.case_id}'"
            new_object = rng.choice(choices)
            # the same prompt, paraphrases and neighbours: only the new object differs
            twin = replace(case, case_id=twin_id, attribute_prompts=(),
                           request=replace(case.request, target_new=new_object, case_id=twin_id),
                           extra={**dict(case.extra), "target_new_id": new_object})
            twin = _stamped(twin, server_round - 1 + rng.random(), conflicts_with=case.case_id)
            out[client, server_round][j] = _stamped(case, case.extra["timestamp"], conflicts_with=twin_id)
            same = scenario.conflict_layout == "same-client" or len(clients) == 1
            holder = client if same else clients[(clients.index(client) + 1) % len(clients)]
            twins.setdefault(holder, []).append(twin)
        for holder, extra_cases in twins.items():
            out[holder, server_round] = out[holder, server_round] + extra_cases
    return out


def _stamped(case: EditCase, timestamp: float, **extra: Any) -> EditCase:
    return replace(case, extra={**dict(case.extra), "timestamp": float(timestamp), **extra})

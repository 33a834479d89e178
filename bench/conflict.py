"""Knowledge conflict: its harm (CollabEdit Table 6), private detection, two-stage resolution (Table 4).

    python bench/conflict.py --pairs 200 --out conflict.json [--quick] [--policy fcfs]
    python bench/conflict.py --model smollm2 --pairs 6 --out conflict_smollm2.json [--model-path DIR] [--cache-dir DIR]

``--model world`` (default) runs on the synthetic world's GPT-2; ``--model smollm2`` on SmolLM2-135M
and its real-fact set (facts at the subject's last token, layers 4-8, lam 10,000:
``fedke/editing/hparams/smollm2.json``; a twin's new object is another object of the relation in
the real-fact table). Default sizes (:data:`SIZES`): world 200 pairs over 10 clients; smollm2 6
pairs over 3 clients (2 requests each plus the twins), sized for about 15 minutes on 2 CPU cores:
the run optimises about 20 x pairs targets (E alone; E and E'; each winner's augmented re-edit of
7-8 requests; the same-client layout's round without and with local resolution, which augments
too) at 4-7 s per request, plus ~10 s per client call.

Every one of the ``--pairs`` edit cases E gets a conflicting twin E' (same subject and relation,
another new object) held by the next client, in the same round (scenario key
``conflict-pairs``, layout ``cross-client``). The same EditClients and CollabEdit strategy as
``flwr run`` run in process:

* **Table 6**: the scores of E when the clients edit E alone, and when they edit E and E'.
* **Detection**: round 1 with ``conflict-detection = "hmac"``; the server's collisions against the
  injected pairs (precision / recall over the claims). Also the after-the-fact signal (each
  client's requests failing on the merged model) against the same truth.
* **Table 4**: the policy picks a winner per pair; Avg-DeltaP = 100 x mean(P(winner's object) -
  P(loser's object)) and Succ = % of prompts whose top-1 next token is the winner's object, on
  the winner's edit prompt, after round 1 ("before") and after round 2 ("after"), where losers
  withdraw and winners re-edit with augmentation (all templates of the relation, 2 paraphrase
  wrappers, 2 related facts of the subject as context). Also on the paraphrase prompts (which
  the augmentation's templates cover) and the winners' full metrics after resolution.
* **same_client**: the pairs held by one client each; without detection vs with local resolution.

Writes {"table6": {"E_only": {...}, "E_and_Eprime": {...}}, "table4": {"before": {"avg_delta_p",
"succ"}, "after": {...}}, "detection": {"precision", "recall"}, ...}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, add_model_arguments, facts_config, fill_model_sizes, peak_rss_mb, print_table, write_json  # noqa: E402

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedke.conflict import detection_scores, failing_cases  # noqa: E402
from fedke.editing import applied_update  # noqa: E402
from fedke.eval import conflict_summary, evaluate_cases, prob_delta  # noqa: E402
from fedke.simulations.client import EditClient  # noqa: E402
from fedke.simulations.client_app import make_client  # noqa: E402
from fedke.simulations.inprocess import LocalProxy, fit_result  # noqa: E402
from fedke.simulations.runtime import dealt_cases_for, testbed_for  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402
from fedke.simulations.wiring import build_strategy  # noqa: E402

log = logging.getLogger("bench.conflict")
BENCH_SECRET = "fedke-bench-federation-secret-not-for-deployment"


def is_twin(case) -> bool:
    return str(case.case_id).endswith("'")


def run_round(strategy, clients, server_round: int) -> dict:
    """One server round in process: every client fits against the global model, the strategy merges."""
    parameters = parameters_to_ndarrays(strategy.update_parameters())
    results = []
    for cid, client in enumerate(clients):
        proxy = LocalProxy(str(cid))
        tic = time.perf_counter()
        arrays, n, metrics = client.fit(parameters, strategy.fit_config(server_round, proxy.cid))
        log.info("round %d, client %d of %d: %d edits in %.1f s", server_round, cid + 1, len(clients),
                 int(metrics.get("n_edits", n)), time.perf_counter() - tic)
        results.append((proxy, fit_result(arrays, n, metrics)))
    _, metrics = strategy.aggregate_fit(server_round, results, [])
    return {"round": metrics, "clients": [res.metrics for _, res in results]}


def metrics_of(bed, update, cases) -> dict:
    with applied_update(bed.model, update):
        summary = evaluate_cases(bed.model, bed.tokenizer, cases).summary
    return {m: summary[m] for m in METRICS}


def table4(bed, update, pairs, *, paraphrases: bool = False) -> dict:
    """Avg-DeltaP and Succ of (winner, loser) pairs on the winner's edit (or paraphrase) prompts."""
    prompts, a, b = [], [], []
    for winner, loser in pairs:
        texts = list(winner.paraphrase_prompts) if paraphrases else [winner.request.text]
        prompts += texts
        a += [winner.request.target_new] * len(texts)
        b += [loser.request.target_new] * len(texts)
    with applied_update(bed.model, update):
        frame = prob_delta(bed.model, bed.tokenizer, prompts, a, b)
    summary = conflict_summary(frame)
    return {"avg_delta_p": summary["Avg-DeltaP"], "succ": summary["Succ"], "n_prompts": summary["n"],
            "p_target": 100.0 * float(frame["p_a"].mean()), "p_conflict": 100.0 * float(frame["p_b"].mean())}


def winners_and_losers(strategy, clients) -> list[tuple]:
    """(winner case, loser case) per resolved conflict, from the coordinator's decisions."""
    by_claim = {}
    for cid, client in enumerate(clients):
        for case in client.cases_until(1):
            by_claim[(str(cid), *client.conflict_agent.tokens(case))] = case
    groups: dict[str, dict[str, list]] = {}
    for _, claim, action in strategy.conflict_coordinator.decisions:
        case = by_claim[(claim.client, claim.token, claim.object_token)]
        groups.setdefault(claim.token, {}).setdefault(action, []).append(case)
    return [(g["win"][0], loser) for g in groups.values() for loser in g.get("lose", [])]


#: Default sizes per --model (see the module docstring); a flag given on the command line wins.
SIZES = {"world": {"pairs": 200, "clients": 10}, "smollm2": {"pairs": 6, "clients": 3}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, SIZES)
    parser.add_argument("--pairs", type=int, help="conflicting pairs (default: the model's SIZES)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--policy", default="fcfs", choices=["fcfs", "fifo", "priority"])
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world, 12 pairs over 3 clients")
    parser.add_argument("--no-same-client", action="store_true", help="skip the same-client layout")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags, the sizes left out filled from :data:`SIZES`."""
    args = build_parser().parse_args(argv)
    fill_model_sizes(args, SIZES)
    if args.pairs < 1 or args.clients < 2:
        raise SystemExit(f"--pairs must be at least 1 and --clients at least 2 (cross-client conflicts), "
                         f"got {args.pairs} and {args.clients}")
    return args


def scenario_from_args(args) -> Scenario:
    """The CollabEdit scenario with ``pairs`` cross-client conflicts, HMAC detection and the policy."""
    if args.quick:
        base = Scenario.from_preset("tiny", num_rounds=1, num_clients=3, edits_per_client=4)
        pairs = min(args.pairs, 12)
    else:
        base = Scenario(model=args.model, model_path=args.model_path, num_rounds=1, num_clients=args.clients,
                        edits_per_client=-(-args.pairs // args.clients))  # every pair's E dealt
        pairs = args.pairs
    return replace(base, strategy="collabedit", conflict_pairs=pairs, conflict_layout="cross-client",
                   conflict_detection="hmac", conflict_policy=args.policy,
                   conflict_priority=",".join(str(i) for i in range(base.num_clients)),
                   conflict_secret=BENCH_SECRET, seed=args.seed, cache_dir=args.cache_dir or base.cache_dir,
                   output_dir=tempfile.mkdtemp(prefix="fedke-conflict-"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    scenario = scenario_from_args(args)
    pairs = scenario.conflict_pairs
    print(f"conflict on {scenario.model_path or scenario.model}: {pairs} pairs over {scenario.num_clients} clients "
          f"({scenario.edits_per_client} requests each plus the twins), policy {args.policy}", flush=True)
    bed = testbed_for(scenario, progress=True)
    dealt = dealt_cases_for(scenario)
    e_cases = [c for (_, r), cs in sorted(dealt.items()) for c in cs if not is_twin(c)]
    print(f"{len(e_cases)} edit cases E, {sum(is_twin(c) for cs in dealt.values() for c in cs)} conflicting twins E', "
          f"{scenario.num_clients} clients", flush=True)

    # ---- Table 6, E alone: the same clients without their twins
    tic = time.perf_counter()
    editor = bed.editor(**scenario.memit_overrides())
    plain = replace(scenario, conflict_detection="off")
    strategy_e = build_strategy(plain, evaluate=False, wait_for_clients=False)
    e_clients = [EditClient(editor, bed.model, bed.tokenizer, {1: [c for c in dealt[cid, 1] if not is_twin(c)]})
                 for cid in range(scenario.num_clients)]
    run_round(strategy_e, e_clients, 1)
    e_only = metrics_of(bed, strategy_e.global_update, e_cases)
    log.info("E alone edited and evaluated in %.1f s", time.perf_counter() - tic)

    # ---- round 1: E and E' with HMAC claims; round 2: resolution
    tic = time.perf_counter()
    strategy = build_strategy(scenario, evaluate=False, wait_for_clients=False)
    clients = [make_client(scenario, cid) for cid in range(scenario.num_clients)]
    round1 = run_round(strategy, clients, 1)
    before_update = {k: v.copy() for k, v in strategy.global_update.items()}
    both = metrics_of(bed, before_update, e_cases)
    log.info("round 1 (E and E') in %.1f s: %s", time.perf_counter() - tic, round1["round"])

    # detection: the server's conflicting claims against the injected pairs
    truth = {(str(cid), *client.conflict_agent.tokens(case))
             for cid, client in enumerate(clients) for case in client.cases_until(1) if "conflicts_with" in case.extra}
    flagged = {(claim.client, claim.token, claim.object_token)
               for collision in strategy.conflict_coordinator.history[0][1] if collision.kind == "conflict"
               for claim in collision.claims}
    detection = detection_scores(flagged, truth)
    with applied_update(bed.model, before_update):
        failing = {(str(cid), c.case_id) for cid, client in enumerate(clients)
                   for c in failing_cases(bed.model, bed.tokenizer, client.cases_until(1))}
    conflicted_ids = {(str(cid), c.case_id) for cid, client in enumerate(clients)
                      for c in client.cases_until(1) if "conflicts_with" in c.extra}
    detection_failures = detection_scores(failing, conflicted_ids)

    resolved = winners_and_losers(strategy, clients)
    before = table4(bed, before_update, resolved)
    before_para = table4(bed, before_update, resolved, paraphrases=True)

    tic = time.perf_counter()
    round2 = run_round(strategy, clients, 2)
    after_update = strategy.global_update
    after = table4(bed, after_update, resolved)
    after_para = table4(bed, after_update, resolved, paraphrases=True)
    winners_after = metrics_of(bed, after_update, [w for w, _ in resolved])
    winners_before = metrics_of(bed, before_update, [w for w, _ in resolved])
    log.info("round 2 (resolution) in %.1f s: %s", time.perf_counter() - tic, round2["round"])

    result = {
        "table6": {"E_only": e_only, "E_and_Eprime": both},
        "table4": {"before": before, "after": after},
        "table4_paraphrases": {"before": before_para, "after": after_para},
        "winners": {"before": winners_before, "after": winners_after},
        "detection": detection,
        "detection_failures": detection_failures,
        "rounds": {"1": round1["round"], "2": round2["round"]},
        "resolution": {"pairs_resolved": len(resolved),
                       "reedited": sum(int(m.get("n_reedited", 0)) for m in round2["clients"]),
                       "withdrawn": sum(int(m.get("n_withdrawn", 0)) for m in round2["clients"]),
                       "augmented_requests": int(round2["round"].get("n_edits", 0))},
        "config": {"pairs": pairs, "clients": scenario.num_clients, "policy": args.policy, "quick": args.quick,
                   **facts_config(bed, scenario),
                   "lam": scenario.settings.memit.lam, "seed": args.seed},
    }

    if not args.no_same_client:
        tic = time.perf_counter()
        same = replace(scenario, conflict_layout="same-client")
        same_dealt = dealt_cases_for(same)
        same_pairs = []
        for (cid, _), cases in same_dealt.items():
            by_id = {c.case_id: c for c in cases}
            for c in cases:
                if "conflicts_with" in c.extra and not is_twin(c):
                    twin = by_id[c.extra["conflicts_with"]]
                    first, second = sorted((c, twin), key=lambda x: x.extra["timestamp"])
                    same_pairs.append((first, second))  # FCFS: the earlier request wins
        rows = {}
        for label, detection_mode in (("unresolved", "off"), ("resolved_locally", "hmac")):
            variant = replace(same, conflict_detection=detection_mode)
            strat = build_strategy(variant, evaluate=False, wait_for_clients=False)
            run_round(strat, [make_client(variant, cid) for cid in range(variant.num_clients)], 1)
            rows[label] = table4(bed, strat.global_update, same_pairs)
        result["same_client"] = rows
        log.info("same-client layout in %.1f s", time.perf_counter() - tic)

    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    print_table([{"set": k, **v} for k, v in result["table6"].items()], ["set", *METRICS],
                f"Table 6: scores of E ({len(e_cases)} cases)")
    rows = [{"stage": k, **v} for k, v in result["table4"].items()]
    rows += [{"stage": f"{k} (paraphrases)", **v} for k, v in result["table4_paraphrases"].items()]
    rows += [{"stage": f"same-client {k}", **v} for k, v in result.get("same_client", {}).items()]
    print_table(rows, ["stage", "avg_delta_p", "succ", "p_target", "p_conflict", "n_prompts"],
                f"Table 4: {len(resolved)} conflicts, policy {args.policy} (paper: -18.11 / 37% before, 17.6 / 77.6% after)")
    print_table([{"mode": "hmac", **detection}, {"mode": "failures (after the fact)", **detection_failures}],
                ["mode", "precision", "recall", "flagged", "true"], "Detection of the injected conflicts")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

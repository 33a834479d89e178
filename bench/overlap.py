"""Knowledge overlap on the world: ||R|| as the same edits are merged again (CollabEdit Figure 3), and the guard.

    python bench/overlap.py --out overlap.json [--quick] [--edits 50] [--repeats 15]

1. **Figure 3.** ``--edits`` requests are merged into the global model ``k = 1..--repeats`` times
   with their targets fixed at the first edit (eq. 6's setting; :func:`fedke.overlap.repeat_residuals`),
   once per editor mode in ``--modes``: ``sequential`` (each repeat is stock MEMIT, i.e. the
   layer-wise CollabEdit merge: every layer solves for what is really left, as eq. 6 assumes) and
   ``decoupled`` (one-shot CollabEdit: every layer's residual is read from the same model, and the
   reference split pushes 1/L + ... + 1 times it, which can overshoot). The first mode's curve is
   ``residual_norm``; every mode's is under ``figure3_modes``.
   After each merge: ``||R||_F`` of the real model at the last edited layer (``residual_norm``),
   the eq. 6 prediction for that layer alone, the residual the editor reports for a fresh edit
   (targets re-optimised, the guard's quantity), and ES / NS of the requests.
2. **Guard.** ``--clients`` clients edit for ``--rounds`` rounds (CollabEdit, in process, the same
   EditClient as ``flwr run``). Every round each client edits ``--others`` fresh requests of its
   own AND re-submits the same ``--overlap`` requests (held by every client, every round: the
   over-repeated edits). With the guard off every re-submission is edited; with the guard on a
   client skips requests whose residual norm against the global model is below the threshold
   (default: 5% of the median residual norm of fresh requests in round 1 of the guard-off run).
   Reported: the other edits' metrics (all rounds' fresh requests) and the repeated ones' after
   the last round, per-round metrics, and how many requests were skipped.

Writes {"repeats": [1..R], "residual_norm": [...], "guard": {"off": {...}, "on": {...}}, ...}.
``--layers 3`` / ``--residual-split even`` change the editor of the Figure 3 study (to see where
the measured ||R|| departs from eq. 6); ``--no-guard`` runs the Figure 3 study only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedke.editing import applied_update  # noqa: E402
from fedke.eval import evaluate_cases  # noqa: E402
from fedke.overlap import repeat_residuals  # noqa: E402
from fedke.simulations.client import EditClient  # noqa: E402
from fedke.simulations.inprocess import LocalProxy, fit_result  # noqa: E402
from fedke.simulations.runtime import testbed_for  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402
from fedke.simulations.server_app import build_strategy  # noqa: E402

log = logging.getLogger("bench.overlap")


def metrics_of(bed, update, cases) -> dict:
    with applied_update(bed.model, update):
        summary = evaluate_cases(bed.model, bed.tokenizer, cases).summary
    return {m: summary[m] for m in METRICS}


def figure3(bed, scenario, cases, repeats: int, **editor_overrides) -> dict:
    """One Figure 3 curve (``editor_overrides`` change the editor, e.g. its mode)."""
    editor = bed.editor(**{**scenario.memit_overrides(), **editor_overrides})

    def evaluate():
        summary = evaluate_cases(bed.model, bed.tokenizer, cases).summary
        return {"ES": summary["ES"], "NS": summary["NS"], "Score": summary["Score"]}

    study = repeat_residuals(editor, bed.model, [c.request for c in cases], repeats, evaluate=evaluate)
    rows = study.rows
    first = rows[0]["residual_norm"]
    return {
        "repeats": [row["repeats"] for row in rows[1:]],
        "residual_norm": [row["residual_norm"] for row in rows[1:]],
        "residual_norm_initial": first,
        "residual_norm_relative": [row["residual_norm"] / first for row in rows[1:]],
        "residual_norm_eq6": [row["residual_norm_eq6"] for row in rows[1:]],
        "residual_norm_reoptimised": [row["residual_norm_reoptimised"] for row in rows[1:]],
        "ES": [row["ES"] for row in rows[1:]], "NS": [row["NS"] for row in rows[1:]],
        "monotone": all(b < a for a, b in zip([first] + [row["residual_norm"] for row in rows[1:]],
                                               [row["residual_norm"] for row in rows[1:]])),
        "rows": rows,
    }


def guard_run(bed, scenario, others_by_client, repeated, rounds: int, threshold: float) -> dict:
    """Rounds of fresh + repeated requests per client; the guard at ``threshold`` (0 = off)."""
    editor = bed.editor(**scenario.memit_overrides())
    clients = [EditClient(editor, bed.model, bed.tokenizer,
                          {t: own[t - 1] + list(repeated) for t in range(1, rounds + 1)}, residual_guard=threshold)
               for own in others_by_client]
    strategy = build_strategy(scenario, evaluate=False, wait_for_clients=False)
    per_round = []
    for server_round in range(1, rounds + 1):
        tic = time.perf_counter()
        parameters = parameters_to_ndarrays(strategy.update_parameters())
        results = []
        for cid, client in enumerate(clients):
            proxy = LocalProxy(str(cid))
            results.append((proxy, fit_result(*client.fit(parameters, strategy.fit_config(server_round, proxy.cid)))))
        _, merge_metrics = strategy.aggregate_fit(server_round, results, [])
        others_so_far = [c for own in others_by_client for t in range(server_round) for c in own[t]]
        row = {"round": server_round, "n_edits": merge_metrics["n_edits"],
               "n_skipped": merge_metrics.get("n_skipped", 0),
               **{k: v for k, v in merge_metrics.items() if k.startswith("residual_norm")},
               "others": metrics_of(bed, strategy.global_update, others_so_far),
               "repeated": metrics_of(bed, strategy.global_update, list(repeated)),
               "seconds": time.perf_counter() - tic}
        log.info("guard %g round %d: %d edits, %d skipped, others Score %.1f, repeated Score %.1f (%.1f s)",
                 threshold, server_round, row["n_edits"], row["n_skipped"], row["others"]["Score"],
                 row["repeated"]["Score"], row["seconds"])
        per_round.append(row)
    last = per_round[-1]
    return {"threshold": threshold, "others": last["others"], "repeated": last["repeated"],
            "n_skipped": sum(r["n_skipped"] for r in per_round), "n_edits": sum(r["n_edits"] for r in per_round),
            "rounds": per_round}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=50, help="requests of the Figure 3 study")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--others", type=int, default=10, help="fresh requests per client and round")
    parser.add_argument("--overlap", type=int, default=10, help="requests every client re-submits every round")
    parser.add_argument("--threshold", type=float, default=None,
                        help="guard threshold (default: 5%% of the median fresh residual norm in round 1)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", help="Figure 3: edited layers (default: the testbed's)")
    parser.add_argument("--residual-split", choices=["remaining", "even"], help="Figure 3: MEMIT's residual split")
    parser.add_argument("--modes", nargs="+", choices=["sequential", "decoupled"], default=["sequential", "decoupled"],
                        help="Figure 3: editor modes, one curve each (the first is the headline residual_norm)")
    parser.add_argument("--no-guard", action="store_true", help="Figure 3 only")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world, small sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    if args.quick:
        scenario = Scenario.from_preset("tiny", num_rounds=1, num_clients=3, edits_per_client=4)
        args.edits, args.clients, args.rounds = min(args.edits, 20), min(args.clients, 3), min(args.rounds, 4)
        args.others, args.overlap = min(args.others, 4), min(args.overlap, 4)
    else:
        scenario = Scenario(model="world", num_rounds=1, num_clients=args.clients, edits_per_client=args.others)
    scenario = replace(scenario, strategy="collabedit")
    bed = testbed_for(scenario, progress=True)

    tic = time.perf_counter()
    fig3_cases = bed.world.edit_cases(args.edits, seed=args.seed)
    overrides = {}
    if args.layers:
        overrides["layers"] = tuple(args.layers)
    if args.residual_split:
        overrides["residual_split"] = args.residual_split
    fig3_modes = {mode: figure3(bed, scenario, fig3_cases, args.repeats, mode=mode, **overrides) for mode in args.modes}
    fig3 = fig3_modes[args.modes[0]]
    log.info("Figure 3 study in %.1f s", time.perf_counter() - tic)

    if args.no_guard:
        off = on = None
        threshold = args.threshold
    else:
        pool = bed.world.edit_cases(args.overlap + args.clients * args.rounds * args.others, seed=args.seed + 1)
        repeated, fresh = pool[:args.overlap], pool[args.overlap:]
        others_by_client = [[fresh[(c * args.rounds + t) * args.others:(c * args.rounds + t + 1) * args.others]
                             for t in range(args.rounds)] for c in range(args.clients)]
        off = guard_run(bed, scenario, others_by_client, repeated, args.rounds, 0.0)
        threshold = args.threshold
        if threshold is None:
            threshold = 0.05 * off["rounds"][0]["residual_norm_median"]
        on = guard_run(bed, scenario, others_by_client, repeated, args.rounds, threshold)

    result = {
        "repeats": fig3["repeats"],
        "residual_norm": fig3["residual_norm"],
        "figure3": {"mode": args.modes[0], **{k: v for k, v in fig3.items() if k not in ("repeats", "residual_norm")}},
        "figure3_modes": {mode: {k: curve[k] for k in ("residual_norm", "residual_norm_initial", "residual_norm_relative",
                                                        "residual_norm_eq6", "ES", "NS", "monotone")}
                          for mode, curve in fig3_modes.items()},
        "guard": {"off": off, "on": on} if off is not None else None,
        "targets": {
            "residual_norm_monotone": fig3["monotone"],
            "residual_norm_monotone_by_mode": {mode: curve["monotone"] for mode, curve in fig3_modes.items()},
            "guard_on_no_worse": on["others"]["Score"] >= off["others"]["Score"] if off is not None else None,
        },
        "config": {"edits": args.edits, "repeats": args.repeats, "clients": args.clients, "rounds": args.rounds,
                   "layers": list(args.layers) if args.layers else list(bed.memit_config.layers),
                   "residual_split": args.residual_split or bed.memit_config.residual_split,
                   "others": args.others, "overlap": args.overlap, "threshold": threshold, "quick": args.quick,
                   "world": bed.world.config.__dict__, "lam": scenario.settings.memit.lam, "seed": args.seed},
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    print_table([{"k": k, "||R||": r, "||R|| / ||R_0||": rel, "eq. 6": e, "re-optimised": o, "ES": es, "NS": ns}
                 for k, r, rel, e, o, es, ns in zip(fig3["repeats"], fig3["residual_norm"],
                                                   fig3["residual_norm_relative"], fig3["residual_norm_eq6"],
                                                   fig3["residual_norm_reoptimised"], fig3["ES"], fig3["NS"])],
                ["k", "||R||", "||R|| / ||R_0||", "eq. 6", "re-optimised", "ES", "NS"],
                f"Figure 3 ({args.modes[0]} MEMIT): ||R|| after merging the same {args.edits} edits k times "
                f"(||R_0|| = {fig3['residual_norm_initial']:.4g})")
    for mode, curve in list(fig3_modes.items())[1:]:
        print(f"{mode}: ||R|| / ||R_0|| = " + " ".join(f"{r:.3g}" for r in curve["residual_norm_relative"])
              + f" (monotone: {curve['monotone']})")
    if off is not None:
        rows = []
        for label, run in (("off", off), ("on", on)):
            rows.append({"guard": label, "set": "others", **run["others"], "skipped": run["n_skipped"]})
            rows.append({"guard": label, "set": "repeated", **run["repeated"], "skipped": run["n_skipped"]})
        print_table(rows, ["guard", "set", *METRICS, "skipped"],
                    f"Guard (threshold {threshold:.4g}): {args.clients} clients x {args.rounds} rounds, "
                    f"{args.others} fresh + {args.overlap} repeated requests each")
    print(f"targets: {result['targets']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

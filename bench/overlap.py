"""Knowledge overlap: ||R|| as the same edits are merged again (CollabEdit Figure 3), and the guard.

    python bench/overlap.py --out overlap.json [--quick] [--edits 50] [--repeats 15]
    python bench/overlap.py --model smollm2 --out overlap_smollm2.json [--model-path DIR] [--cache-dir DIR]

``--model world`` (default) runs on the synthetic world's GPT-2 (facts at the prompt's last token,
layers 1-3, lam 300); ``--model smollm2`` on SmolLM2-135M and its real-fact set (facts at the
subject's last token, layers 4-8, lam 10,000: ``fedke/editing/hparams/smollm2.json``). The sizes
default per model (:data:`SIZES`):

* world: 50 requests x 15 repeats; guard 5 clients x 6 rounds x (10 fresh + 10 repeated);
* smollm2: 10 requests x 12 repeats, the re-optimised residual at every 4th repeat (not before the
  first merge); guard 2 clients x 3 rounds x (2 fresh + 2 repeated). Sized for about 15 minutes on 2 CPU cores,
  where one target optimisation costs ~6 s per request (Figure 3 optimises its targets once per
  mode; the guard optimises every submitted request every round, the repeated ones too, and the
  kept ones again when the guard skips some).

1. **Figure 3.** ``--edits`` requests are merged into the global model ``k = 1..--repeats`` times
   with their targets fixed at the first edit (eq. 6's setting; :func:`fedke.overlap.repeat_residuals`),
   once per editor mode in ``--modes``: ``sequential`` (each repeat is stock MEMIT, i.e. the
   layer-wise CollabEdit merge: every layer solves for what is really left, as eq. 6 assumes) and
   ``decoupled`` (one-shot CollabEdit: every layer's residual is read from the same model, and the
   reference split pushes 1/L + ... + 1 times it, which can overshoot). The first mode's curve is
   ``residual_norm``; every mode's is under ``figure3_modes``.
   After each merge: ``||R||_F`` of the real model at the last edited layer (``residual_norm``),
   the eq. 6 prediction for that layer alone, the residual the editor reports for a fresh edit
   (targets re-optimised, the guard's quantity; every ``--reoptimise-every`` repeats and after the
   last, null in between; before any merge only when it is 1), and ES / NS of the requests.
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
from _common import METRICS, add_model_arguments, facts_config, fill_model_sizes, peak_rss_mb, print_table, write_json  # noqa: E402

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedke.editing import applied_update  # noqa: E402
from fedke.eval import evaluate_cases  # noqa: E402
from fedke.overlap import repeat_residuals  # noqa: E402
from fedke.simulations.client import EditClient  # noqa: E402
from fedke.simulations.inprocess import LocalProxy, fit_result  # noqa: E402
from fedke.simulations.runtime import testbed_for  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402
from fedke.simulations.wiring import build_strategy  # noqa: E402

log = logging.getLogger("bench.overlap")


def metrics_of(bed, update, cases) -> dict:
    with applied_update(bed.model, update):
        summary = evaluate_cases(bed.model, bed.tokenizer, cases).summary
    return {m: summary[m] for m in METRICS}


def figure3(bed, scenario, cases, repeats: int, *, reoptimise_every: int = 1, **editor_overrides) -> dict:
    """One Figure 3 curve (``editor_overrides`` change the editor, e.g. its mode).

    After each merge ``k`` (0 = before any): ES / NS / Score of ``cases``, and the residual norm of
    targets re-optimised against the merged model (what the guard sees) at ``k = N, 2N, ...`` and the
    last repeat for ``N = reoptimise_every`` (None at the other ``k``; 0: never). ``k = 0`` is measured
    only with ``N = 1``: before any merge a fresh optimisation redoes the fixed targets' (the most
    costly one, as no target is in the model yet)."""
    editor = bed.editor(**{**scenario.memit_overrides(), **editor_overrides})
    requests = [c.request for c in cases]
    merges = iter(range(repeats + 1))  # repeat_residuals calls evaluate once per k = 0..repeats, in order

    def evaluate():
        k = next(merges)
        summary = evaluate_cases(bed.model, bed.tokenizer, cases).summary
        row = {"ES": summary["ES"], "NS": summary["NS"], "Score": summary["Score"]}
        if reoptimise_every and (k % reoptimise_every == 0 or k == repeats) and (k > 0 or reoptimise_every == 1):
            tic = time.perf_counter()
            fresh = editor.compute_targets(requests)
            row["residual_norm_reoptimised"] = float((fresh.z - fresh.h_init).norm())
            log.info("repeat %d: re-optimised residual %.4g (%.1f s)", k, row["residual_norm_reoptimised"],
                     time.perf_counter() - tic)
        else:
            row["residual_norm_reoptimised"] = None
        log.info("repeat %d of %d (%s): ES %.1f, NS %.1f", k, repeats, editor.config.mode, row["ES"], row["NS"])
        return row

    tic = time.perf_counter()
    study = repeat_residuals(editor, bed.model, requests, repeats, evaluate=evaluate, reoptimised=False)
    log.info("Figure 3 (%s MEMIT, %d requests x %d repeats) in %.1f s", editor.config.mode, len(requests), repeats,
             time.perf_counter() - tic)
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


#: Default sizes per --model (see the module docstring); a flag given on the command line wins.
SIZES = {
    "world": {"edits": 50, "repeats": 15, "reoptimise_every": 1, "clients": 5, "rounds": 6, "others": 10,
              "overlap": 10},
    "smollm2": {"edits": 10, "repeats": 12, "reoptimise_every": 4, "clients": 2, "rounds": 3, "others": 2,
                "overlap": 2},
}


def guard_effect(off: dict | None, on: dict | None) -> dict | None:
    """The guard's effect after the last round: metric points (on - off) of the other (fresh) edits and
    of the repeated ones, and how many requests it skipped."""
    if off is None or on is None:
        return None
    return {"others": {m: on["others"][m] - off["others"][m] for m in METRICS},
            "repeated": {m: on["repeated"][m] - off["repeated"][m] for m in METRICS},
            "n_skipped": on["n_skipped"], "n_edits_off": off["n_edits"], "n_edits_on": on["n_edits"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, SIZES)
    parser.add_argument("--edits", type=int, help="requests of the Figure 3 study (default: the model's SIZES)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--reoptimise-every", type=int,
                        help="Figure 3: re-optimise the targets every N repeats and after the last (0: never)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--others", type=int, help="fresh requests per client and round")
    parser.add_argument("--overlap", type=int, help="requests every client re-submits every round")
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
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags, the sizes left out filled from :data:`SIZES` (``--quick``: the tiny world's)."""
    args = build_parser().parse_args(argv)
    fill_model_sizes(args, SIZES)
    if args.quick:
        args.edits, args.clients, args.rounds = min(args.edits, 20), min(args.clients, 3), min(args.rounds, 4)
        args.others, args.overlap = min(args.others, 4), min(args.overlap, 4)
    for key in ("edits", "repeats", "clients", "rounds", "others"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.overlap < 0 or args.reoptimise_every < 0:
        raise SystemExit("--overlap and --reoptimise-every must be at least 0")
    return args


def scenario_from_args(args) -> Scenario:
    """The CollabEdit scenario whose testbed (model, facts, statistics) and editor settings the study uses.

    Its ``edits_per_client`` is what a guard-run client submits per round (fresh + repeated): the
    server rejects payloads with more edits than that."""
    sizes = dict(num_rounds=1, num_clients=args.clients, edits_per_client=args.others + args.overlap)
    if args.quick:
        scenario = Scenario.from_preset("tiny", **sizes)
    else:
        scenario = Scenario(model=args.model, model_path=args.model_path, **sizes)
    return replace(scenario, strategy="collabedit", cache_dir=args.cache_dir or scenario.cache_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    scenario = scenario_from_args(args)
    print(f"overlap on {scenario.model_path or scenario.model}: Figure 3 {args.edits} requests x {args.repeats} "
          f"repeats ({', '.join(args.modes)}); guard {args.clients} clients x {args.rounds} rounds x "
          f"({args.others} fresh + {args.overlap} repeated)", flush=True)
    bed = testbed_for(scenario, progress=True)

    tic = time.perf_counter()
    fig3_cases = bed.world.edit_cases(args.edits, seed=args.seed)
    overrides = {}
    if args.layers:
        overrides["layers"] = tuple(args.layers)
    if args.residual_split:
        overrides["residual_split"] = args.residual_split
    fig3_modes = {mode: figure3(bed, scenario, fig3_cases, args.repeats, reoptimise_every=args.reoptimise_every,
                                mode=mode, **overrides) for mode in args.modes}
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
                   **facts_config(bed, scenario),
                   "lam": scenario.settings.memit.lam, "reoptimise_every": args.reoptimise_every, "seed": args.seed},
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
        print(f"guard effect (on - off): {guard_effect(off, on)}")
    print(f"targets: {result['targets']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

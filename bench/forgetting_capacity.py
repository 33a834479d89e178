"""Is the forgetting left under dynamic C a matter of model capacity? The same scenario, wider models.

    python bench/forgetting_capacity.py --widths 128 256 --out capacity.json [--quick]

Issue 4's benchmark (``bench/forgetting.py``) finds that dynamic C slows forgetting but does not hold
the old edits within 3 points: their neighbourhood accuracy collapses as thousands of edits go into
3 layers of a 4 x 128 world model. This script tests that explanation directly. It builds world
models of several widths on one world (each cached like the default one) and runs the same
dynamic-C forgetting scenario on each: the same requests, the same rounds, the same lam and betas.
If capacity is the cause, the old edits' drop shrinks as the width grows.

Writes ``{"config", "runs"}``; each run holds ``model_width``, ``n_params``, ``train_acc``,
``heldout_acc``, ``build_seconds`` (loading the testbed, building it when not cached), ``before`` and ``after_dynamic`` (the old edits'
Table 5 metrics, x100), ``drop`` (before minus after, per metric) and ``seconds_per_round``.
The default world is smaller than the product default (400 subjects) so that a 256-wide model builds
in about 20 minutes on 2 cores; the edit load relative to the facts the model knows (0.4) matches issue 4's
benchmark (2,000 edits over 5,000 facts).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402
from forgetting import TABLE5, add_small_world_arguments, run_one, small_world_scenario  # noqa: E402

from fedke.simulations.runtime import testbed_for  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    add_small_world_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny world, widths 32 and 64, 4 rounds x 3 clients")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.layers, args.subjects, args.relations = [32, 64], 3, 120, 3
        args.rounds, args.clients, args.lam = 4, 3, 30.0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    base = small_world_scenario(args)
    runs = []
    for width in args.widths:
        scenario = replace(base, model_width=width)
        started = time.perf_counter()
        testbed = testbed_for(scenario, progress=True)
        build_seconds = time.perf_counter() - started
        report = testbed.world_model.report
        n_params = sum(p.numel() for p in testbed.model.parameters())
        print(f"\nwidth {width}: {n_params:,} parameters, train acc "
              f"{report.get('train_acc')}, held-out {report.get('heldout_acc')} ({build_seconds:.0f} s to load/build)",
              flush=True)
        per_round: list = []
        seen = run_one(scenario, "dynamic", per_round, {}, None)
        drop = {key: seen["before"][key] - seen["after"][key] for key in TABLE5}
        runs.append({"model_width": width, "n_params": n_params,
                     "train_acc": report.get("train_acc"), "heldout_acc": report.get("heldout_acc"),
                     "build_seconds": build_seconds, "before": seen["before"], "after_dynamic": seen["after"],
                     "drop": drop, "seconds_per_round": sum(e["seconds"] for e in per_round) / len(per_round)})

    rows = [{"width": run["model_width"], "stage": stage, **run[stage]}
            for run in runs for stage in ("before", "after_dynamic", "drop")]
    print_table(rows, ["width", "stage", *TABLE5],
                f"Old edits under dynamic C, {args.rounds - 1} rounds of {args.clients} x {args.edits_per_client} "
                f"new edits, world {args.subjects} x {args.relations}, {args.layers} layers, lam {args.lam} (x100)")
    result = {"config": {key: value for key, value in vars(args).items() if key not in ("out", "quick")},
              "runs": runs}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

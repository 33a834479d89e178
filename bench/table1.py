"""The CollabEdit paper's Table 1 on the embedded world: the same edits through every method.

    python bench/table1.py --clients 10 --edits-per-client 50 --mode decoupled --out table1.json [--quick]

Each client edits its requests once; the same payloads are merged by CollabEdit, FedAvg,
TaskArithmetic and TIES; Global-Edit edits all requests in one call. Writes
{"methods": {name: {ES, PS, NS, Score, EA, PA, NA, AccScore}}, "collab_vs_global_rel_error",
"config", "seconds"}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

from fedke.simulations.inprocess import compare_methods  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402


def relative_error(update, reference) -> float:
    num = sum(float(np.linalg.norm(update[k] - reference[k]) ** 2) for k in reference)
    den = sum(float(np.linalg.norm(reference[k]) ** 2) for k in reference)
    return (num / den) ** 0.5


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--edits-per-client", type=int, default=50)
    parser.add_argument("--mode", choices=["decoupled", "sequential"], default="decoupled")
    parser.add_argument("--lam", type=float, default=None, help="MEMIT lambda (default: the scenario's)")
    parser.add_argument("--ta-lambda", type=float, default=1.0)
    parser.add_argument("--ties-k", type=float, default=0.2)
    parser.add_argument("--ties-lambda", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world, 3 clients x 4 edits")
    args = parser.parse_args(argv)
    overrides = dict(editor_mode=args.mode, ta_lambda=args.ta_lambda, ties_k=args.ties_k,
                     ties_lambda=args.ties_lambda, seed=args.seed, output_dir="fedke-results/table1")
    if args.lam is not None:
        overrides["lam"] = args.lam
    if args.quick:
        scenario = Scenario.from_preset("tiny", num_rounds=1, **overrides)
    else:
        scenario = Scenario(num_clients=args.clients, edits_per_client=args.edits_per_client, **overrides)
    started = time.perf_counter()
    comparison = compare_methods(scenario)
    seconds = time.perf_counter() - started
    summary = comparison.summary
    order = ["Unedited", "GlobalEdit", "CollabEdit", "FedAvg", "TaskArithmetic", "TIES"]
    methods = {name: {m: float(summary.loc[name, m]) for m in METRICS} for name in order if name in summary.index}
    error = relative_error(comparison.updates["CollabEdit"], comparison.updates["GlobalEdit"])
    rows = [{"method": name, **values} for name, values in methods.items()]
    print_table(rows, ["method", *METRICS], f"Table 1 on the world: {scenario.num_clients} clients x "
                f"{scenario.edits_per_client} edits, {args.mode} MEMIT, lambda {scenario.lam:g}")
    global_score = methods["GlobalEdit"]
    print(f"\nCollabEdit vs Global-Edit merged update: relative Frobenius error {error:.3g}")
    for name in ("FedAvg", "TaskArithmetic", "TIES"):
        gap = (global_score["Score"] - methods[name]["Score"], global_score["AccScore"] - methods[name]["AccScore"])
        print(f"{name:15s} below Global-Edit by {gap[0]:6.1f} Score, {gap[1]:6.1f} AccScore")
    result = {"methods": methods, "collab_vs_global_rel_error": error,
              "config": scenario.to_run_config(), "seconds": {**comparison.seconds, "total": seconds},
              "peak_rss_mb": peak_rss_mb()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""The CollabEdit paper's Table 1 on the embedded world: the same edits through every method.

    python bench/table1.py --clients 10 --edits-per-client 50 --mode decoupled --out table1.json [--quick]

Each client edits its requests once; the same payloads are merged by CollabEdit, FedAvg,
TaskArithmetic and TIES; Global-Edit edits all requests in one call. Writes
{"methods": {name: {ES, PS, NS, Score, EA, PA, NA, AccScore}}, "collab_vs_global_rel_error",
"config", "seconds"}. With ``--mode sequential`` it also runs layer-wise CollabEdit
(:mod:`fedke.layerwise`, one exchange per edited layer) and adds ``"layerwise_collab"``: its
metrics and its merged update's relative error against sequential Global-Edit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

from dataclasses import replace  # noqa: E402

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedke.codec import decode_payload, encode_payload  # noqa: E402
from fedke.simulations.inprocess import compare_methods, fit_result  # noqa: E402
from fedke.simulations.runtime import dealt_cases_for, evaluate_update  # noqa: E402
from fedke.simulations.server_app import build_strategy  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402


def relative_error(update, reference) -> float:
    num = sum(float(np.linalg.norm(update[k] - reference[k]) ** 2) for k in reference)
    den = sum(float(np.linalg.norm(reference[k]) ** 2) for k in reference)
    return (num / den) ** 0.5


def comparison_cases(scenario):
    return [case for cases in dealt_cases_for(scenario).values() for case in cases]


def merge_at_float32(scenario, comparison):
    """CollabEdit over the same client payloads sent as float32: (error vs Global-Edit, update)."""
    replies = []
    for proxy, res in comparison.replies:
        payload = decode_payload(parameters_to_ndarrays(res.parameters))
        replies.append((proxy, fit_result(encode_payload(payload, dtype=np.float32), res.num_examples, {})))
    strategy = build_strategy(replace(scenario, strategy="collabedit", wire_dtype="float32"), evaluate=False,
                              wait_for_clients=False)
    strategy.aggregate_fit(1, replies, [])
    return relative_error(strategy.global_update, comparison.updates["GlobalEdit"]), strategy.global_update


def run_layerwise(scenario, global_update) -> dict:
    """Layer-wise CollabEdit (fedke.layerwise) over the same clients' requests: its metrics and its
    merged update's relative error against sequential Global-Edit."""
    from fedke.layerwise import layerwise_collab_edit
    from fedke.simulations.runtime import testbed_for

    dealt = dealt_cases_for(scenario)
    clients = [[case.request for case in dealt[cid, 1]] for cid in range(scenario.num_clients)]
    editor = testbed_for(scenario).editor(**scenario.memit_overrides())
    started = time.perf_counter()
    update = layerwise_collab_edit(editor, clients)
    seconds = time.perf_counter() - started
    metrics = evaluate_update(scenario, update, 1, comparison_cases(scenario))
    return {**{m: float(metrics[m]) for m in METRICS}, "rel_error_vs_global": relative_error(update, global_update),
            "layers": list(update), "seconds": seconds}


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
    parser.add_argument("--wire-dtype", choices=["float32", "float64"], default="float32",
                        help="payload precision on the wire for the table (the error is reported for both)")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world, 3 clients x 4 edits")
    args = parser.parse_args(argv)
    overrides = dict(editor_mode=args.mode, wire_dtype="float64", ta_lambda=args.ta_lambda, ties_k=args.ties_k,
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
    error = relative_error(comparison.updates["CollabEdit"], comparison.updates["GlobalEdit"])
    error_f32, collab_f32 = merge_at_float32(scenario, comparison)
    if args.wire_dtype == "float32":  # the table shows what a float32 deployment gets
        methods_f32 = evaluate_update(scenario, collab_f32, 1, comparison_cases(scenario))
        summary.loc["CollabEdit", list(methods_f32)] = list(methods_f32.values())
    order = ["Unedited", "GlobalEdit", "CollabEdit", "FedAvg", "TaskArithmetic", "TIES"]
    methods = {name: {m: float(summary.loc[name, m]) for m in METRICS} for name in order if name in summary.index}
    rows = [{"method": name, **values} for name, values in methods.items()]
    print_table(rows, ["method", *METRICS], f"Table 1 on the world: {scenario.num_clients} clients x "
                f"{scenario.edits_per_client} edits, {args.mode} MEMIT, lambda {scenario.lam:g}")
    global_score = methods["GlobalEdit"]
    print(f"\nCollabEdit vs Global-Edit merged update: relative Frobenius error {error:.3g} with float64 "
          f"payloads, {error_f32:.3g} with float32 payloads (the table's CollabEdit row: {args.wire_dtype})")
    for name in ("FedAvg", "TaskArithmetic", "TIES"):
        gap = (global_score["Score"] - methods[name]["Score"], global_score["AccScore"] - methods[name]["AccScore"])
        print(f"{name:15s} below Global-Edit by {gap[0]:6.1f} Score, {gap[1]:6.1f} AccScore")
    layerwise = None
    if args.mode == "sequential":
        layerwise = run_layerwise(scenario, comparison.updates["GlobalEdit"])
        print(f"\nLayer-wise CollabEdit ({len(layerwise['layers'])} sub-rounds): Score {layerwise['Score']:.1f}, "
              f"AccScore {layerwise['AccScore']:.1f}; merged update vs Global-Edit relative error "
              f"{layerwise['rel_error_vs_global']:.3g} (one-shot CollabEdit: {error:.3g})")
    result = {"methods": methods, "collab_vs_global_rel_error": error,
              "collab_vs_global_rel_error_float32_wire": error_f32, "wire_dtype": args.wire_dtype,
              "config": scenario.to_run_config(), "seconds": {**comparison.seconds, "total": seconds},
              "peak_rss_mb": peak_rss_mb()}
    if layerwise is not None:
        result["layerwise_collab"] = layerwise
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

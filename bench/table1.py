"""The CollabEdit paper's Table 1: the same edits through every method, on the world or a real model.

    python bench/table1.py --clients 10 --edits-per-client 50 --mode decoupled --out table1.json [--quick]
    python bench/table1.py --model smollm2 --clients 10 --edits-per-client 50 --mode decoupled --out F

Each client edits its requests once; the same payloads are merged by CollabEdit, FedAvg,
TaskArithmetic and TIES; Global-Edit edits all requests in one call. Writes
{"methods": {name: {ES, PS, NS, Score, EA, PA, NA, AccScore}}, "model", "n_facts_held" (the facts the
model's edit-case source holds), "rel_error_collab_vs_global" (on the wire dtype of the table's
CollabEdit row, float32 by default), "collab_vs_global_rel_error" (float64 payloads), "config", "seconds"}.

With ``--mode sequential`` CollabEdit is layer-wise CollabEdit through its Flower strategy and the
same clients (:class:`fedke.strategies.LayerwiseCollabEdit`, one server round per edited layer;
the scenario's ``layerwise = "auto"``): the ``CollabEdit`` row and ``collab_vs_global_rel_error``
are that path's, ``"layerwise_collab"`` repeats its metrics, error and seconds, and the one-shot
merge of the clients' sequential payloads stays in the table as ``CollabEdit (one-shot)`` with its
own errors (``one_shot_collab_vs_global_rel_error``, ``..._float32_wire``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

from dataclasses import replace  # noqa: E402

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedke.merge import relative_update_error  # noqa: E402
from fedke.codec import decode_payload, encode_payload  # noqa: E402
from fedke.simulations.client_app import make_client  # noqa: E402
from fedke.simulations.inprocess import ONE_SHOT_LABEL, compare_methods, fit_result, layerwise_collab  # noqa: E402
from fedke.simulations.oracle import evaluate_update  # noqa: E402
from fedke.simulations.runtime import dealt_cases_for, testbed_for  # noqa: E402
from fedke.simulations.wiring import build_strategy  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402


def comparison_cases(scenario):
    return [case for cases in dealt_cases_for(scenario).values() for case in cases]


def merge_at_float32(scenario, comparison):
    """One-shot CollabEdit over the same client payloads sent as float32: (error vs Global-Edit, update)."""
    replies = []
    for proxy, res in comparison.replies:
        payload = decode_payload(parameters_to_ndarrays(res.parameters))
        replies.append((proxy, fit_result(encode_payload(payload, dtype=np.float32), res.num_examples, {})))
    strategy = build_strategy(replace(scenario, strategy="collabedit", wire_dtype="float32", layerwise="false", passes=1),
                              evaluate=False, wait_for_clients=False)
    strategy.aggregate_fit(1, replies, [])
    return relative_update_error(strategy.global_update, comparison.updates["GlobalEdit"]), strategy.global_update


def layerwise_at_float32(scenario, comparison):
    """Layer-wise CollabEdit with every array on the wire in float32, the same clients' requests; their
    targets (kept in the clients' state, keyed by the round-start update's values) are reused.
    Returns (error vs Global-Edit, update, seconds)."""
    wire32 = replace(scenario, wire_dtype="float32")
    clients = [make_client(wire32, cid, state=client.state) for cid, client in enumerate(comparison.clients)]
    strategy, seconds = layerwise_collab(wire32, clients)
    return relative_update_error(strategy.global_update, comparison.updates["GlobalEdit"]), strategy.global_update, seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--edits-per-client", type=int, default=50)
    parser.add_argument("--mode", choices=["decoupled", "sequential"], default="decoupled")
    parser.add_argument("--lam", type=float, default=None, help="MEMIT lambda (default: the scenario's)")
    parser.add_argument("--passes", type=int, default=1,
                        help="MEMIT passes (> 1 needs --mode sequential: CollabEdit then runs passes x L layer steps)")
    parser.add_argument("--ta-lambda", type=float, default=1.0)
    parser.add_argument("--ties-k", type=float, default=0.2)
    parser.add_argument("--ties-lambda", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wire-dtype", choices=["float32", "float64"], default="float32",
                        help="payload precision on the wire for the table (the error is reported for both)")
    parser.add_argument("--model", default="world",
                        help="world (the synthetic world's GPT-2) or smollm2 (the real model; its real-fact set)")
    parser.add_argument("--model-path", default="", help="a real model from a local path (with --model smollm2)")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="keys and targets bit-identical whatever the batch (the scenario key batch-invariant): "
                             "CollabEdit then equals Global-Edit up to the wire's rounding")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world, 3 clients x 4 edits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = dict(editor_mode=args.mode, wire_dtype="float64", ta_lambda=args.ta_lambda, ties_k=args.ties_k,
                     ties_lambda=args.ties_lambda, seed=args.seed, passes=args.passes, output_dir="fedke-results/table1",
                     cache_dir=args.cache_dir, batch_invariant=args.batch_invariant)
    if args.lam is not None:
        overrides["lam"] = args.lam
    if args.quick:
        scenario = Scenario.from_preset("tiny", num_rounds=1, **overrides)
    else:
        scenario = Scenario(model=args.model, model_path=args.model_path, num_clients=args.clients,
                            edits_per_client=args.edits_per_client, **overrides)
    started = time.perf_counter()
    comparison = compare_methods(scenario)
    seconds = time.perf_counter() - started
    summary = comparison.summary
    cases = comparison_cases(scenario)
    layerwise = ONE_SHOT_LABEL in comparison.updates  # sequential MEMIT: CollabEdit runs layer-wise
    error = relative_update_error(comparison.updates["CollabEdit"], comparison.updates["GlobalEdit"])
    one_shot_f32_error, one_shot_f32 = merge_at_float32(scenario, comparison)
    if layerwise:
        error_f32, collab_f32, seconds_f32 = layerwise_at_float32(scenario, comparison)
    else:
        error_f32, collab_f32 = one_shot_f32_error, one_shot_f32
    if args.wire_dtype == "float32":  # the table shows what a float32 deployment gets
        rows_f32 = {"CollabEdit": collab_f32, **({ONE_SHOT_LABEL: one_shot_f32} if layerwise else {})}
        for name, update in rows_f32.items():
            methods_f32 = evaluate_update(scenario, update, 1, cases)
            summary.loc[name, list(methods_f32)] = list(methods_f32.values())
    order = ["Unedited", "GlobalEdit", "CollabEdit", ONE_SHOT_LABEL, "FedAvg", "TaskArithmetic", "TIES"]
    methods = {name: {m: float(summary.loc[name, m]) for m in METRICS} for name in order if name in summary.index}
    rows = [{"method": name, **values} for name, values in methods.items()]
    collab_name = "layer-wise CollabEdit (Flower strategy)" if layerwise else "CollabEdit"
    bed = testbed_for(scenario)
    model_name = scenario.model_path or scenario.model
    print_table(rows, ["method", *METRICS], f"Table 1 on {model_name}: {scenario.num_clients} clients x "
                f"{scenario.edits_per_client} edits, {args.mode} MEMIT, lambda {scenario.settings.memit.lam:g}"
                + (f"; CollabEdit = {collab_name}" if layerwise else ""))
    global_score = methods["GlobalEdit"]
    print(f"\n{collab_name} vs Global-Edit merged update: relative Frobenius error {error:.3g} with float64 "
          f"payloads, {error_f32:.3g} with float32 payloads (the table's CollabEdit row: {args.wire_dtype})")
    one_shot_error = None
    if layerwise:
        one_shot_error = relative_update_error(comparison.updates[ONE_SHOT_LABEL], comparison.updates["GlobalEdit"])
        print(f"one-shot CollabEdit of the sequential payloads vs Global-Edit: relative error {one_shot_error:.3g} "
              f"(float64), {one_shot_f32_error:.3g} (float32)")
    for name in (["CollabEdit", ONE_SHOT_LABEL] if layerwise else []) + ["FedAvg", "TaskArithmetic", "TIES"]:
        gap = (global_score["Score"] - methods[name]["Score"], global_score["AccScore"] - methods[name]["AccScore"])
        print(f"{name:22s} below Global-Edit by {gap[0]:6.1f} Score, {gap[1]:6.1f} AccScore")
    n_facts = len(bed.facts.fact_pairs())
    result = {"methods": methods, "model": model_name, "n_facts_held": n_facts,
              "rel_error_collab_vs_global": error_f32 if args.wire_dtype == "float32" else error,
              "collab_vs_global_rel_error": error,
              "collab_vs_global_rel_error_float32_wire": error_f32, "wire_dtype": args.wire_dtype,
              "config": scenario.to_run_config(), "seconds": {**comparison.seconds, "total": seconds},
              "peak_rss_mb": peak_rss_mb()}
    if layerwise:
        result["one_shot_collab_vs_global_rel_error"] = one_shot_error
        result["one_shot_collab_vs_global_rel_error_float32_wire"] = one_shot_f32_error
        result["layerwise_collab"] = {**methods["CollabEdit"], "rel_error_vs_global": error,
                                      "rel_error_vs_global_float32_wire": error_f32,
                                      "layers": list(comparison.updates["CollabEdit"]),
                                      "seconds": comparison.seconds["CollabEdit"], "seconds_float32_rerun": seconds_f32,
                                      "path": "fedke.strategies.LayerwiseCollabEdit + EditClient sub-rounds"}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""Editors side by side, merged the CollabEdit way: MEMIT and AlphaEdit (MALMEN is not built yet).

    python bench/editors.py --model smollm2 --clients 10 --edits-per-client 20 --out editors.json
    python bench/editors.py --quick            # the tiny world, 3 clients x 4 edits

The same dealt requests for every editor. Each client optimises the target vectors of its own
requests, and Global-Edit those of all requests; targets do not depend on the editor (only the
per-layer solve does), so each set is optimised once and both editors solve with it. Per editor:
every client edits (keys + solve), the payloads travel as float32 (the wire's default), the server
merges them with CollabEdit (that editor's regularisers: ``lam C0`` for MEMIT, ``alpha I`` on
projected keys for AlphaEdit) and with Task Arithmetic, and Global-Edit edits everything at once.

Writes ``{"editors": {"memit" | "alphaedit": {"GlobalEdit": {metrics}, "CollabEdit": {...},
"TaskArithmetic": {...}, "rel_error_collab_vs_global": x, "seconds_per_edit": x}}}``, exactly the issue's
keys (the run's settings are printed), metrics as in Table 1 (ES PS NS Score EA PA NA AccScore). ``seconds_per_edit``: the clients' target
optimisation (shared) plus that editor's client keys and solves, over the number of edits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, add_model_arguments, facts_config, fill_model_sizes, print_table, write_json  # noqa: E402

from fedke.merge import relative_update_error  # noqa: E402
from fedke.codec import encode_payload  # noqa: E402
from fedke.simulations.inprocess import LocalProxy, fit_result  # noqa: E402
from fedke.simulations.oracle import evaluate_update  # noqa: E402
from fedke.simulations.runtime import dealt_cases_for, testbed_for  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402
from fedke.simulations.wiring import build_strategy  # noqa: E402

EDITORS = ("memit", "alphaedit")
SIZES = {"world": {"clients": 10, "edits_per_client": 20}, "smollm2": {"clients": 10, "edits_per_client": 20}}
log = logging.getLogger("bench.editors")


def merged(scenario: Scenario, strategy: str, replies) -> dict[str, np.ndarray]:
    """The server's merge of ``replies`` with ``strategy`` (its editor's regularisers)."""
    server = build_strategy(replace(scenario, strategy=strategy, layerwise="false"), evaluate=False,
                            wait_for_clients=False)
    server.aggregate_fit(1, replies, [])
    return {name: update.copy() for name, update in server.global_update.items()}


def run_editor(scenario: Scenario, name: str, client_requests, client_targets, all_requests, global_targets,
               cases, target_seconds: float) -> dict:
    scenario = replace(scenario, editor=name)
    editor = testbed_for(scenario).editor(**scenario.memit_overrides())
    started = time.perf_counter()
    payloads = [editor.edit(requests, targets=targets) for requests, targets in zip(client_requests, client_targets)]
    client_seconds = time.perf_counter() - started
    replies = [(LocalProxy(str(i)), fit_result(encode_payload(p, dtype=np.float32), p.n_edits, {}))
               for i, p in enumerate(payloads)]
    updates = {"GlobalEdit": editor.edit(all_requests, targets=global_targets).deltas(),
               "CollabEdit": merged(scenario, "collabedit", replies),
               "TaskArithmetic": merged(scenario, "task_arithmetic", replies)}
    row = {method: evaluate_update(scenario, update, 1, cases) for method, update in updates.items()}
    row["rel_error_collab_vs_global"] = relative_update_error(updates["CollabEdit"], updates["GlobalEdit"])
    row["seconds_per_edit"] = (target_seconds + client_seconds) / len(all_requests)
    log.info("%s: CollabEdit vs Global-Edit %.3g, %.2f s per edit", name, row["rel_error_collab_vs_global"],
             row["seconds_per_edit"])
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, SIZES)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--edits-per-client", type=int, default=None)
    parser.add_argument("--editors", nargs="+", choices=EDITORS, default=list(EDITORS))
    parser.add_argument("--nullspace-threshold", type=float, default=None, help="AlphaEdit (default: the scenario's)")
    parser.add_argument("--alphaedit-l2", type=float, default=None, help="AlphaEdit (default: the scenario's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny world, 3 clients x 4 edits")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fill_model_sizes(args, SIZES)
    settings = {key: value for key, value in (("nullspace_threshold", args.nullspace_threshold),
                                              ("alphaedit_l2", args.alphaedit_l2)) if value is not None}
    if args.quick:
        scenario = Scenario.from_preset("tiny", num_rounds=1, num_clients=3, edits_per_client=4, seed=args.seed,
                                        cache_dir=args.cache_dir, output_dir="fedke-results/editors", **settings)
    else:
        scenario = Scenario(model=args.model, model_path=args.model_path, cache_dir=args.cache_dir,
                            num_clients=args.clients, edits_per_client=args.edits_per_client, seed=args.seed,
                            output_dir="fedke-results/editors", **settings)
    bed = testbed_for(scenario)
    dealt = dealt_cases_for(scenario)
    client_cases = [dealt[(cid, 1)] for cid in range(scenario.num_clients)]
    cases = [case for mine in client_cases for case in mine]
    client_requests = [[case.request for case in mine] for mine in client_cases]
    all_requests = [case.request for case in cases]
    targets_editor = bed.editor(**scenario.memit_overrides())  # targets do not depend on the editor's solve
    started = time.perf_counter()
    client_targets = []
    for cid, requests in enumerate(client_requests):
        client_targets.append(targets_editor.compute_targets(requests))
        log.info("client %d/%d: targets optimised (%.1f s so far)", cid + 1, len(client_requests),
                 time.perf_counter() - started)
    target_seconds = time.perf_counter() - started
    log.info("Global-Edit: targets of %d requests", len(all_requests))
    global_targets = targets_editor.compute_targets(all_requests, progress=True)

    result = {"editors": {}}  # exactly the key; the run's settings are printed below
    settings = {"nullspace_threshold": scenario.nullspace_threshold, "alphaedit_l2": scenario.alphaedit_l2,
                "client_target_seconds": round(target_seconds, 1), **facts_config(bed, scenario)}
    rows = []
    for name in args.editors:
        row = run_editor(scenario, name, client_requests, client_targets, all_requests, global_targets, cases,
                         target_seconds)
        result["editors"][name] = row
        for method in ("GlobalEdit", "CollabEdit", "TaskArithmetic"):
            rows.append({"editor": name, "method": method, **row[method]})
    print_table(rows, ["editor", "method", *METRICS],
                f"Editors on {scenario.model_path or scenario.model}: {scenario.num_clients} clients x "
                f"{scenario.edits_per_client} edits, float32 wire")
    for name, row in result["editors"].items():
        print(f"{name}: CollabEdit vs Global-Edit relative error {row['rel_error_collab_vs_global']:.3g}, "
              f"{row['seconds_per_edit']:.2f} s per edit")
    print(f"settings: {settings}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

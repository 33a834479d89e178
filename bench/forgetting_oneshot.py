"""The forgetting scenario's requests edited in ONE Global-Edit batch, set beside dynamic C's rounds.

    python bench/forgetting_oneshot.py --rounds 100 --clients 10 --edits-per-client 2 \
        --at 1 10 40 100 --lams 300 --compare bench/results/forgetting.json --out oneshot.json [--quick]

With beta0 = beta1 = 1, dynamic C is recursive least squares. Round t solves

    Delta_t (lam C0 + sum_{s<t} K_s K_s^T + K_t K_t^T) = R_t K_t^T,   R_t = V_t - W_{t-1} K_t,

and on a LINEAR layer with fixed keys and targets that is exactly the one-shot solution over every
key so far: W_t - W_0 = (sum_s V_s K_s^T - W_0 sum_s K_s K_s^T) (lam C0 + sum_s K_s K_s^T)^-1.
A transformer is not that layer: each round's keys, target vectors and residuals are taken on the
model the earlier rounds edited. This script measures how far apart the two are on the forgetting
scenario of ``bench/forgetting.py`` (the same requests, in the same rounds): for each round count
t in ``--at``, each ``--lams`` lam and each ``--knowledge-weights`` alpha, one Global-Edit of E_o
plus the new sets of rounds 2..t, scored on E_o and on the new requests. At t = 1 it is round 1 of
a multi-round run exactly (decoupled CollabEdit merges to Global-Edit). Target vectors are
optimised once, on the unedited model, and reused for every batch.

Writes ``{"config", "runs", "dynamic"}``: ``runs`` has one entry per (lam, alpha, rounds) with
``n_edits``, ``old`` and ``new`` (Table 5's metrics, x100; ``new`` is empty at round 1) and
``seconds`` (keys, solve, evaluation); ``dynamic`` holds the old edits' metrics at the same rounds
from the ``--compare`` file (``bench/forgetting.py``'s ``per_round``, dynamic covariance), if given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402
from forgetting import TABLE5  # noqa: E402

from fedke.editing import applied_update  # noqa: E402
from fedke.editing.memit import Targets  # noqa: E402
from fedke.eval import evaluate_cases  # noqa: E402
from fedke.simulations.oracle import round_cases  # noqa: E402
from fedke.simulations.runtime import testbed_for  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402


def optimise_targets(editor, requests, chunk: int) -> Targets:
    """Every request's target vector on the unedited model, ``chunk`` requests per optimisation
    (each request is optimised on its own, so chunks change nothing but the memory)."""
    parts = [editor.compute_targets(requests[start:start + chunk]) for start in range(0, len(requests), chunk)]
    return Targets(tuple(key for part in parts for key in part.requests), torch.cat([part.z for part in parts]),
                   torch.cat([part.h_init for part in parts]), parts[0].signature)


def dynamic_old_metrics(path: str, rounds: list[int]) -> dict[str, dict]:
    """The old edits' metrics under dynamic C at ``rounds``, from a ``bench/forgetting.py`` result."""
    per_round = json.loads(Path(path).read_text())["per_round"]
    found = {entry["round"]: entry for entry in per_round if entry["covariance"] == "dynamic"}
    return {str(r): {key: found[r][f"old_{key}"] for key in TABLE5} for r in rounds if r in found}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="the scenario's Flower rounds (round 1: E_o)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--edits-per-client", type=int, default=2)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 10, 40, 100],
                        help="round counts t: one batch of the requests of rounds 1..t each")
    parser.add_argument("--knowledge-weights", type=float, nargs="+", default=[0.0])
    parser.add_argument("--lams", type=float, nargs="+", default=None, help="MEMIT lams (default: the preset's)")
    parser.add_argument("--preset", default="world")
    parser.add_argument("--subjects", type=int, default=None, help="world subjects (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=200, help="requests per target optimisation")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--compare", default=None, help="a bench/forgetting.py result to set beside the batches")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 6 rounds x 3 clients")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.rounds, args.clients = "tiny", min(args.rounds, 6), min(args.clients, 3)
        args.at = [1, args.rounds]
    if not all(1 <= t <= args.rounds for t in args.at):
        parser.error(f"--at round counts must be in 1..--rounds ({args.rounds}), got {args.at}")
    logging.basicConfig(level=logging.WARNING)

    overrides = dict(num_rounds=args.rounds, num_clients=args.clients, edits_per_client=args.edits_per_client,
                     forgetting=True, strategy="global", seed=args.seed)
    if args.subjects is not None:
        overrides["world_subjects"] = args.subjects
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    scenario = Scenario.from_preset(args.preset, **overrides)
    bed = testbed_for(scenario, progress=True)
    at = sorted(set(args.at))
    by_round = {r: round_cases(scenario, r) for r in range(1, at[-1] + 1)}
    everything = [case for r in range(1, at[-1] + 1) for case in by_round[r]]
    print(f"one-shot: {len(everything)} requests of rounds 1..{at[-1]} ({scenario.num_clients} x "
          f"{scenario.edits_per_client} per round), world {scenario.world_subjects} x {scenario.world_relations}, "
          f"model {scenario.model_layers} x {scenario.model_width}, lam {scenario.settings.memit.lam}", flush=True)

    started = time.perf_counter()
    base_editor = bed.editor(**scenario.memit_overrides())
    targets = optimise_targets(base_editor, [case.request for case in everything], args.chunk)
    target_seconds = time.perf_counter() - started
    print(f"targets of {len(everything)} requests: {target_seconds:.0f} s", flush=True)

    runs = []
    settings = [(lam, weight) for lam in (args.lams or [scenario.settings.memit.lam]) for weight in args.knowledge_weights]
    for lam, weight in settings:
        editor = bed.editor(progress=True, **{**scenario.memit_overrides(), "lam": lam, "knowledge_weight": weight})
        for t in at:
            started = time.perf_counter()
            n_old, n = len(by_round[1]), sum(len(by_round[r]) for r in range(1, t + 1))
            batch = everything[:n]
            payload = editor.edit([case.request for case in batch], targets=targets.subset(range(n)))
            with applied_update(bed.model, payload.deltas()):
                old = evaluate_cases(bed.model, bed.tokenizer, batch[:n_old]).summary
                new = evaluate_cases(bed.model, bed.tokenizer, batch[n_old:]).summary if n > n_old else {}
            run = {"lam": lam, "knowledge_weight": weight, "rounds": t, "n_edits": n,
                   "old": {key: float(old[key]) for key in TABLE5},
                   "new": {key: float(new[key]) for key in TABLE5} if new else {},
                   "seconds": time.perf_counter() - started}
            runs.append(run)
            print(f"lam {lam:g}, alpha {weight:g}, rounds 1..{t} ({n} edits): old Score {run['old']['Score']:.1f} "
                  f"AccScore {run['old']['AccScore']:.1f} EA {run['old']['EA']:.1f} NA {run['old']['NA']:.1f} "
                  f"({run['seconds']:.0f} s)", flush=True)

    dynamic = dynamic_old_metrics(args.compare, at) if args.compare else {}
    rows = [{"lam": f"{run['lam']:g}", "alpha": f"{run['knowledge_weight']:g}", "rounds": run["rounds"], "n_edits": run["n_edits"],
             "set": name, **run[name]} for run in runs for name in ("old", "new") if run[name]]
    rows += [{"lam": "dynamic C", "alpha": "(--compare)", "rounds": int(r), "set": "old", **values} for r, values in dynamic.items()]
    print_table(rows, ["lam", "alpha", "rounds", "n_edits", "set", *TABLE5],
                "One Global-Edit of every request of rounds 1..t (x100), and dynamic C's run after round t")
    result = {"config": {key: value for key, value in vars(args).items() if key not in ("out", "quick", "compare")}
              | {"target_seconds": target_seconds, "preset_lam": scenario.settings.memit.lam},
              "runs": runs, "dynamic": dynamic}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

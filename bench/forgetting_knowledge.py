"""Does a C0 that holds the model's known facts stop the forgetting? A sweep over knowledge_weight.

    python bench/forgetting_knowledge.py --weights 0 0.002 0.005 0.01 --out knowledge.json [--quick]

Issue 4's benchmark (``bench/forgetting.py``) finds that dynamic C slows forgetting but that the old
edits' neighbourhood accuracy still collapses, and ``bench/forgetting_capacity.py`` that a wider model
does not change that. This script tests the other explanation: MEMIT's C0, taken over the world's
generic text, barely weighs the keys where the world model reads its facts (the prompt's last
token), so nothing in ``lam C0`` keeps a new edit off the facts the model already holds.
``knowledge_weight = alpha`` adds them: ``A0 = lam C0 + alpha K0 K0^T`` over the keys of every known
fact in every trained template (:meth:`fedke.testbed.Testbed.knowledge_grams`). The same forgetting
scenario runs once per alpha (dynamic C, or ``--covariance immutable``).

Writes ``{"config", "world_model", "key_space", "runs"}`` (``world_model``: its train and held-out accuracy,
epochs and parameters). ``key_space`` describes, per edited layer, how the known
facts' keys sit against MEMIT's regulariser: ``d_in``, ``n_keys``, ``rank_90`` / ``rank_99`` (how
many directions hold 90% / 99% of ``K0 K0^T``'s energy) and ``directions_over_a0`` /
``directions_over_10x_a0`` (eigenvalues of ``K0 K0^T`` whitened by ``A0 = lam C0`` above 1 / 10: the
directions where the facts outweigh what protects them). Each run holds ``knowledge_weight``, ``before`` and ``after`` (the
old edits' Table 5 metrics, x100, after round 1 and after the last round), ``drop`` (before minus
after), ``new_at_own_round`` (the new sets' metrics in the round that edited them, averaged over the
rounds: how well new edits still take) and ``seconds_per_round``. The default world is the 400 x 5
world of ``forgetting_capacity.py`` (the edit load of issue 4's benchmark in 40 rounds).
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
from _common import print_table, write_json  # noqa: E402
from forgetting import TABLE5, add_small_world_arguments, run_one, small_world_scenario  # noqa: E402

from fedke.simulations.runtime import testbed_for  # noqa: E402


def key_space(grams: dict[str, np.ndarray], regularisers: dict[str, np.ndarray], n_keys: int) -> dict[str, dict]:
    """Per layer: the energy ranks of ``K0 K0^T`` and its eigenvalues whitened by ``A0`` (Cholesky)."""
    report = {}
    for name, gram in grams.items():
        energy = np.linalg.eigvalsh(gram)[::-1].clip(min=0)
        cumulative = np.cumsum(energy) / energy.sum()
        factor = np.linalg.cholesky(regularisers[name])
        half = np.linalg.solve(factor, gram)                      # L^-1 G
        whitened = np.linalg.solve(factor, half.T)                # L^-1 G L^-T (G symmetric)
        eigen = np.linalg.eigvalsh((whitened + whitened.T) / 2)
        report[name] = {"d_in": int(gram.shape[0]), "n_keys": n_keys,
                        "rank_90": int(np.searchsorted(cumulative, 0.90)) + 1,
                        "rank_99": int(np.searchsorted(cumulative, 0.99)) + 1,
                        "directions_over_a0": int((eigen > 1).sum()), "directions_over_10x_a0": int((eigen > 10).sum())}
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.002, 0.005, 0.01],
                        help="alphas to run (none: only the key-space report)")
    parser.add_argument("--covariance", choices=["dynamic", "immutable"], default="dynamic")
    parser.add_argument("--width", type=int, default=128)
    add_small_world_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="the tiny preset's world, 4 rounds x 3 clients")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.relations, args.width, args.layers = 120, 3, 64, 3
        args.rounds, args.clients, args.lam, args.weights = 4, 3, 30.0, [0.0, 0.05]
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    base = small_world_scenario(args, model_width=args.width)
    bed = testbed_for(base, progress=True)
    started = time.perf_counter()
    grams = bed.knowledge_grams(progress=True)  # once, on the unedited model (cached on disk)
    n_keys = len(bed.world.known_fact_requests())
    print(f"knowledge keys of {n_keys} fact statements: {time.perf_counter() - started:.0f} s", flush=True)
    space = key_space(grams, bed.editor(**base.memit_overrides()).regularisers(), n_keys)
    print_table([{"layer": name, **row} for name, row in space.items()],
                ["layer", "d_in", "n_keys", "rank_90", "rank_99", "directions_over_a0", "directions_over_10x_a0"],
                "Known facts' keys K0 against A0 = lam C0 (directions: eigenvalues of K0 K0^T whitened by A0)")
    runs = []
    for weight in args.weights:
        scenario = replace(base, knowledge_weight=weight)
        print(f"\nknowledge_weight {weight}", flush=True)
        per_round: list = []
        seen = run_one(scenario, args.covariance, per_round, {}, None)
        own = [entry for entry in per_round if "new_Score" in entry]
        runs.append({"knowledge_weight": weight, "before": seen["before"], "after": seen["after"],
                     "drop": {key: seen["before"][key] - seen["after"][key] for key in TABLE5},
                     "new_at_own_round": {key: sum(e[f"new_{key}"] for e in own) / len(own) for key in TABLE5},
                     "seconds_per_round": sum(e["seconds"] for e in per_round) / len(per_round)})

    report = bed.world_model.report
    result = {"config": {key: value for key, value in vars(args).items() if key not in ("out", "quick")},
              "world_model": {key: report.get(key) for key in ("train_acc", "heldout_acc", "epochs", "n_params")},
              "key_space": space, "runs": runs}
    rows = [{"alpha": f"{run['knowledge_weight']:g}", "stage": stage, **run[stage]}
            for run in runs for stage in ("before", "after", "drop", "new_at_own_round")]
    if rows:
        print_table(rows, ["alpha", "stage", *TABLE5],
                    f"Old edits under {args.covariance} C with A0 = lam C0 + alpha K0 K0^T, {args.rounds - 1} rounds of "
                    f"{args.clients} x {args.edits_per_client} new edits, world {args.subjects} x {args.relations}, "
                    f"model {args.layers} x {args.width}, {args.editor_mode} MEMIT, lam {args.lam} "
                    "(x100; new_at_own_round: new edits in their round)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

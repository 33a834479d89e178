"""Knowledge forgetting over many rounds, immutable vs dynamic covariance (CollabEdit Table 5).

    python bench/forgetting.py --rounds 100 --clients 10 --edits-per-client 2 --out forgetting.json [--quick]

Two multi-round runs of the same forgetting scenario (``forgetting = true``): Flower round 1 edits
the old requests E_o (clients x edits-per-client of them, spread over the clients); every later
round edits new requests unrelated to them (other subjects and relations). The first run merges
with immutable C, the second with the dynamic C of eq. 7 (``A_t = beta0 lam C0 + beta1 sum K K^T``).
Each round the global model is measured on E_o, and on that round's new set; every new set again
at the end. The server state is checkpointed after every round, as a long run would be (pass
``--no-checkpoint`` to leave that out of the timing).

Writes exactly ``{"before", "after_immutable", "after_dynamic", "per_round", "seconds_per_round",
"peak_rss_mb"}``:

* ``before``: E_o's metrics after round 1 (the paper's "before m rounds"; the same in both runs);
  ``after_immutable`` / ``after_dynamic``: after the last round. Each holds NS, PS, ES, Score,
  NA, PA, EA, AccScore (x100), Table 5's columns.
* ``per_round``: one entry per run and round: ``covariance``, ``round``, ``seconds`` (wall),
  ``cpu_seconds`` (this process's CPU time: robust on a shared machine), ``rss_mb`` (current),
  ``peak_rss_mb``, E_o's metrics (``old_<metric>``), and that round's new set's
  (``new_<metric>``); the last round's entries add ``new_all_<metric>`` (every new request).
* ``seconds_per_round``: the mean wall-clock time of a round over both runs (edit, merge,
  evaluation, checkpoint).
* ``peak_rss_mb``: ``[first, last]``: this process's peak RSS after round ``min(10, rounds)`` of
  the first run and after the last round of the second (the target: last <= 1.1 x first).

The table printed also gives the projected time of a 1,000-round run (from the mean time of the
last rounds before the final one, plus the final evaluation of every new set scaled to 1,000
rounds). ``--quick`` runs the tiny preset (6 rounds, 3 clients x 2 edits).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from fedke.simulations.multiround import current_rss_mb, peak_rss_mb, run_multiround  # noqa: E402
from fedke.simulations.oracle import NEW_ALL, OLD_SET, new_set_name  # noqa: E402
from fedke.simulations.scenario import Scenario  # noqa: E402
from fedke.testbed import STRONG_TARGETS  # noqa: E402

TABLE5 = ["NS", "PS", "ES", "Score", "NA", "PA", "EA", "AccScore"]
RSS_ROUND = 10


#: The preset each --model starts from (simulations/presets/).
MODEL_PRESETS = {"world": "world", "smollm2": "default"}


def scenario_from_args(args) -> Scenario:
    preset = "tiny" if args.quick else (args.preset or MODEL_PRESETS[args.model])
    overrides = dict(num_rounds=args.rounds, num_clients=args.clients, edits_per_client=args.edits_per_client,
                     forgetting=True, strategy=args.method, beta0=args.beta0, beta1=args.beta1,
                     old_relations=args.old_relations, seed=args.seed, knowledge_weight=args.knowledge_weight,
                     editor_mode=args.editor_mode)
    for key in ("lam", "model_width", "model_epochs", "target_steps", "target_clamp", "target_loss_stop"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    if args.model_path:
        overrides["model_path"] = args.model_path
    return Scenario.from_preset(preset, **overrides)


def add_small_world_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe scenario of ``forgetting_capacity.py`` / ``forgetting_knowledge.py``: a 400 x 5 world,
    39 rounds of 10 x 2 new edits after the old ones (the edit load per known fact of this benchmark)."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=400)
    parser.add_argument("--relations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--edits-per-client", type=int, default=2)
    parser.add_argument("--lam", type=float, default=300.0)
    parser.add_argument("--beta0", type=float, default=1.0)
    parser.add_argument("--beta1", type=float, default=1.0)
    add_editor_mode_argument(parser)
    parser.add_argument("--model-epochs", type=int, default=Scenario.model_epochs,
                        help="the world model's most training epochs (wider models need more: 4 x 256 took 47)")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--out", default=None)


def add_editor_mode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--editor-mode", choices=["decoupled", "sequential"], default="decoupled",
                        help="MEMIT's layers: decoupled (the CollabEdit authors') or sequential (stock MEMIT; "
                             "CollabEdit then runs layer-wise, still equal to Global-Edit)")


def small_world_scenario(args, **overrides) -> Scenario:
    """The forgetting scenario of :func:`add_small_world_arguments`'s arguments."""
    return Scenario.from_preset("world", num_rounds=args.rounds, num_clients=args.clients,
                                edits_per_client=args.edits_per_client, forgetting=True, lam=args.lam,
                                beta0=args.beta0, beta1=args.beta1, world_subjects=args.subjects,
                                world_relations=args.relations, model_layers=args.layers, editor_mode=args.editor_mode,
                                model_epochs=args.model_epochs,
                                **({"cache_dir": args.cache_dir} if args.cache_dir else {}), **overrides)


def _table5(metrics: dict) -> dict:
    return {key: float(metrics[key]) for key in TABLE5}


def run_one(scenario: Scenario, covariance: str, per_round: list, rss: dict, checkpoint_root: Path | None) -> dict:
    """One run; appends its per-round entries; returns E_o's metrics after round 1 and after the last."""
    run = replace(scenario, covariance=covariance,
                  checkpoint_dir=str(checkpoint_root / covariance) if checkpoint_root else "",
                  output_dir=str((checkpoint_root or Path(tempfile.gettempdir())) / f"results-{covariance}"))
    seen: dict = {}
    clock = {"cpu": time.process_time()}

    def on_round(server_round: int, metrics: dict, seconds: float) -> None:
        cpu, clock["cpu"] = time.process_time() - clock["cpu"], time.process_time()
        entry = {"covariance": covariance, "round": server_round, "seconds": seconds, "cpu_seconds": cpu,
                 "rss_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb()}
        entry.update({f"old_{k}": float(v) for k, v in metrics[OLD_SET].items() if k in TABLE5})
        if server_round > 1:
            entry.update({f"new_{k}": float(v) for k, v in metrics[new_set_name(server_round)].items() if k in TABLE5})
        if NEW_ALL in metrics:
            entry.update({f"new_all_{k}": float(v) for k, v in metrics[NEW_ALL].items() if k in TABLE5})
        per_round.append(entry)
        if server_round == 1:
            seen["before"] = _table5(metrics[OLD_SET])
        seen["after"] = _table5(metrics[OLD_SET])
        if server_round == min(RSS_ROUND, scenario.num_rounds):
            rss.setdefault("first", peak_rss_mb())
        print(f"[{covariance}] round {server_round}/{scenario.num_rounds}: {seconds:.2f} s, old Score "
              f"{entry['old_Score']:.1f} AccScore {entry['old_AccScore']:.1f}, RSS {entry['rss_mb']:.0f} MiB "
              f"(peak {entry['peak_rss_mb']:.0f})", flush=True)

    run_multiround(run, write=False, on_round=on_round)
    rss["last"] = peak_rss_mb()
    return seen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="Flower rounds (round 1 edits the old set)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--edits-per-client", type=int, default=2)
    parser.add_argument("--method", choices=["collabedit", "global"], default="collabedit")
    parser.add_argument("--beta0", type=float, default=1.0)
    parser.add_argument("--beta1", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=None, help="MEMIT lam (default: the preset's)")
    add_editor_mode_argument(parser)
    parser.add_argument("--model-width", type=int, default=None, help="the world model's width (default: the preset's)")
    parser.add_argument("--model-epochs", type=int, default=None,
                        help="the world model's most training epochs (default: the preset's; wider models need more)")
    strong = (f"--target-steps {STRONG_TARGETS['v_num_grad_steps']} --target-clamp {STRONG_TARGETS['clamp_norm_factor']} "
              f"--target-loss-stop {STRONG_TARGETS['loss_stop']}")
    parser.add_argument("--target-steps", type=int, default=None,
                        help=f"MEMIT target-optimisation steps (default: the model's settings file, 25)")
    parser.add_argument("--target-clamp", type=float, default=None,
                        help=f"MEMIT clamp_norm_factor (default: the model's settings file, 0.75)")
    parser.add_argument("--target-loss-stop", type=float, default=None,
                        help=f"stop optimising a target below this mean NLL (default: the preset's, "
                             f"0.05); fedke.testbed.STRONG_TARGETS is {strong}")
    parser.add_argument("--knowledge-weight", type=float, default=0.0,
                        help="alpha of A0 = lam C0 + alpha K0 K0^T over the world's known facts (0: MEMIT's C0)")
    parser.add_argument("--old-relations", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="world",
                        help="world (the synthetic world's GPT-2) or smollm2 (the real model and its real-fact set)")
    parser.add_argument("--model-path", default="", help="a real model from a local path (with --model smollm2)")
    parser.add_argument("--preset", default=None, help="a preset of simulations/presets (default: the model's)")
    parser.add_argument("--runs", nargs="+", choices=["immutable", "dynamic"], default=["immutable", "dynamic"],
                        help="which covariance runs (a run left out writes null for its after_ key)")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint every round")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 6 rounds, 3 clients x 2 edits")
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``argv`` through ``parser`` (default: :func:`build_parser`'s; scripts that extend it pass
    theirs), with ``--quick``'s tiny sizes applied."""
    args = (parser or build_parser()).parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.edits_per_client = min(args.rounds, 6), min(args.clients, 3), 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    scenario = scenario_from_args(args)
    model = (f"model {scenario.model_path or scenario.model}" if not scenario.is_world else
             f"world {scenario.world_subjects} x {scenario.world_relations}, model {scenario.model_layers} x "
             f"{scenario.model_width} (at most {scenario.model_epochs} epochs)")
    memit = scenario.settings.memit
    print(f"forgetting: {scenario.num_rounds} rounds x {scenario.num_clients} clients x {scenario.edits_per_client} "
          f"edits, {scenario.strategy}, {model}, lam {memit.lam}, targets {memit.v_num_grad_steps} steps / clamp "
          f"{memit.clamp_norm_factor} / stop {memit.loss_stop}, knowledge weight {scenario.knowledge_weight}, "
          f"{scenario.editor_mode} MEMIT, {scenario.old_relations} old relation(s), dynamic beta0={scenario.beta0} "
          f"beta1={scenario.beta1}", flush=True)

    checkpoint_root = None if args.no_checkpoint else Path(tempfile.mkdtemp(prefix="fedke-forgetting-"))
    per_round: list = []
    rss: dict = {}
    started = time.perf_counter()
    seen: dict[str, dict] = {}
    try:
        for covariance in args.runs:
            seen[covariance] = run_one(scenario, covariance, per_round, rss, checkpoint_root)
    finally:
        if checkpoint_root is not None:
            shutil.rmtree(checkpoint_root, ignore_errors=True)
    befores = [run["before"] for run in seen.values()]
    if any(before != befores[0] for before in befores):  # round 1 merges with A0 in both runs
        print(f"warning: round 1 differs between the runs: {befores}")
    seconds = [entry["seconds"] for entry in per_round]
    result = {
        "before": befores[0],
        "after_immutable": seen["immutable"]["after"] if "immutable" in seen else None,
        "after_dynamic": seen["dynamic"]["after"] if "dynamic" in seen else None,
        "per_round": per_round,
        "seconds_per_round": sum(seconds) / len(seconds),
        "peak_rss_mb": [rss["first"], rss["last"]],
    }

    import pandas as pd

    table = pd.DataFrame({"before": result["before"], **{f"after ({cov} C)": seen[cov]["after"] for cov in seen}}).T[TABLE5]
    print(f"\nOld edits E_o before and after {scenario.num_rounds - 1} rounds of new edits (x100)")
    print(table.round(2).to_string())
    finals = [entry for entry in per_round if f"new_all_Score" in entry]
    if finals:
        new = pd.DataFrame({entry["covariance"]: {k: entry[f"new_all_{k}"] for k in TABLE5} for entry in finals}).T
        print("\nAll new edits after the last round (x100)")
        print(new[TABLE5].round(2).to_string())
    # the projection: the mean of each run's last rounds before the final one (which scores every
    # new set once), plus that final evaluation scaled to 1000 rounds' worth of new sets
    tail = max(1, min(10, scenario.num_rounds // 2))
    runs = [[e for e in per_round if e["covariance"] == cov] for cov in seen]
    late = [entry["seconds"] for run in runs for entry in (run[-tail - 1:-1] if len(run) > 1 else run)]
    late_mean = sum(late) / len(late)
    cpu_late = [entry["cpu_seconds"] for run in runs for entry in (run[-tail - 1:-1] if len(run) > 1 else run)]
    final_extra = sum(max(0.0, run[-1]["seconds"] - late_mean) for run in runs) / len(runs)
    projected_h = (1000 * late_mean + final_extra * 1000 / max(1, scenario.num_rounds)) / 3600
    for name in ("Score", "AccScore", "EA"):
        print(f"old {name}: " + ", ".join(f"{cov} {seen[cov]['after'][name] - result['before'][name]:+.2f}"
                                          for cov in seen) + " points vs before")
    first, last = result["peak_rss_mb"]
    print(f"\nseconds per round {result['seconds_per_round']:.2f} (last {tail} rounds before the final one: "
          f"{late_mean:.2f}; the final round's evaluation of every new set: +{final_extra:.1f} s); "
          f"projected 1000-round run: {projected_h:.2f} h; CPU seconds per round (same rounds): "
          f"{sum(cpu_late) / len(cpu_late):.2f}")
    print(f"peak RSS after round {min(RSS_ROUND, scenario.num_rounds)}: {first:.0f} MiB, at the end: {last:.0f} MiB "
          f"(x{last / first:.3f}); total {time.perf_counter() - started:.0f} s")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

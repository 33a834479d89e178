"""Build the embedded world model from scratch and report its accuracy.

    python bench/world.py --out world.json [--quick]

Writes {"build_seconds", "train_acc", "heldout_acc", "n_facts", "n_params"} (accuracies x100).
The build happens in a fresh temporary cache, so it is always a first build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

from fedke.data.world import WorldConfig  # noqa: E402
from fedke.worldmodel import WorldModelConfig, cache_key, load_world_model  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="a tiny world (120 subjects, 3 relations, 3x64 model)")
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--relations", type=int, default=5)
    parser.add_argument("--cache-dir", help="build into this cache (it must not hold the model yet) instead of a "
                        "temporary one, e.g. to keep the model for the other benchmarks")
    args = parser.parse_args(argv)
    if args.quick:
        world_config, model_config = WorldConfig(n_subjects=120, n_relations=3), WorldModelConfig(n_layer=3, n_embd=64, n_head=2)
    else:
        world_config, model_config = WorldConfig(n_subjects=args.subjects, n_relations=args.relations), WorldModelConfig()
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache_dir or scratch
        if (Path(cache) / "world-models" / cache_key(world_config, model_config)).exists():
            parser.error(f"{cache} already holds this world model: the build would not be measured")
        started = time.perf_counter()
        world_model = load_world_model(world_config, model_config, cache_dir=cache, progress=True)
        build_seconds = time.perf_counter() - started
    report = world_model.report
    result = {
        "build_seconds": build_seconds, "train_acc": report["train_acc"], "heldout_acc": report["heldout_acc"],
        "n_facts": report["n_facts"], "n_params": report["n_params"],
    }
    print_table([{**result, "epochs": report["epochs"]}], list(result) + ["epochs"], "world model build")
    write_json(args.out, {**result, "epochs": report["epochs"], "world": report["world"], "model": report["model"]})
    return result


if __name__ == "__main__":
    main()

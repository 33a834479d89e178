"""Shared bits of the benchmark scripts: peak RSS, JSON output, table printing."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

METRICS = ["ES", "PS", "NS", "Score", "EA", "PA", "NA", "AccScore"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` (nothing if None), secrets redacted wherever they sit
    (a run config's ``conflict-secret``: :func:`fedke.simulations.results.redact_config`)."""
    from fedke.simulations.results import redact_config

    text = json.dumps(redact_config(payload), indent=2, default=float)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    columns = [c for c in columns if c in frame.columns]
    if title:
        print(f"\n{title}")
    print(frame[columns].round(2).to_string(index=False))


def add_model_arguments(parser, models) -> None:
    """``--model`` (one of ``models``, default ``world``), ``--model-path`` and ``--cache-dir``."""
    parser.add_argument("--model", choices=sorted(models), default="world",
                        help="world (the synthetic world's GPT-2) or smollm2 (the real model and its real-fact set)")
    parser.add_argument("--model-path", default="", help="a real model from a local path (with --model smollm2)")
    parser.add_argument("--cache-dir", default="", help="where models, facts and statistics are cached")


def fill_model_sizes(args, sizes: dict) -> None:
    """Refuse ``--quick`` / ``--model-path`` with the wrong model; fill the sizes left out from
    ``sizes[args.model]``."""
    if args.quick and args.model != "world":
        raise SystemExit("--quick runs the tiny world; leave out --model or use --model world")
    if args.model_path and args.model == "world":
        raise SystemExit("--model-path needs a real model: add --model smollm2")
    for key, value in sizes[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def facts_config(bed, scenario) -> dict:
    """What the edit cases came from (the world's config, or the real model and its fact set) and
    the fact token they were edited at."""
    fact_token = scenario.memit_overrides()["fact_token"]
    if scenario.is_world:
        return {"model": "world", "world": bed.world.config.__dict__, "fact_token": fact_token}
    info = bed.info
    return {"model": scenario.model_path or scenario.model, "world": None,
            "facts": {"name": info.get("facts"), "n_facts_held": info.get("n_facts_held"),
                      "model_fingerprint": info.get("model_fingerprint")}, "fact_token": fact_token}

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

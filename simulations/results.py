"""Result writers: tidy long tables (CSV and Parquet) plus JSON, rewritten after every round.

One row per (round, method, request set, metric): ``round, method, request_set, metric, value``.
``summary()`` pivots the last round into the wide table people read (ES, PS, NS, Score, ...).

Secrets are never written down: :func:`redact_config` replaces the value of every key in
:data:`SECRET_KEYS` (the run-config key ``conflict-secret``, the node-config key
``federation-secret``, in either spelling) by :data:`REDACTED`, and :class:`ResultsWriter` keeps
only the redacted copy of the config it is given, so ``results.json`` records whether a secret was
set, never the secret. The checkpoint (:mod:`fedke.simulations.checkpoint`) and the benchmarks'
JSON (``bench/_common.py``) use the same function.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from fedke.cache import atomic_write_bytes, atomic_write_json
from fedke.plots import METHOD_NAMES

log = logging.getLogger(__name__)
METRIC_ORDER = ["ES", "PS", "NS", "Score", "EA", "PA", "NA", "AccScore"]

#: Config keys whose values are secrets (run config: ``conflict-secret``; node config:
#: ``federation-secret``), as run-config keys and as Scenario field names.
SECRET_KEYS = ("conflict-secret", "conflict_secret", "federation-secret", "federation_secret")
#: What a set secret's value is replaced by wherever a config is written.
REDACTED = "<redacted>"


def redact_config(config: Mapping[str, Any], secret_keys: Sequence[str] = SECRET_KEYS) -> dict[str, Any]:
    """A copy of ``config`` with the value of every secret key replaced by :data:`REDACTED`.

    Nested mappings and lists are redacted too (a config inside a benchmark's payload). An empty
    or absent secret stays as it is (there is nothing to hide, and it shows none was set). The
    caller's config is not changed.
    """
    return _redact(config, tuple(secret_keys))


def _redact(value: Any, secret_keys: tuple[str, ...]) -> Any:
    if isinstance(value, Mapping):
        return {key: (REDACTED if key in secret_keys and item not in (None, "") else _redact(item, secret_keys))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(item, secret_keys) for item in value]
    return value


class ResultsWriter:
    """Collects metrics rows and writes ``results.csv``, ``results.parquet`` and ``results.json``.

    Memory grows with rows (a few per round), never with payloads or models. ``config`` (the run
    config) is kept redacted (:func:`redact_config`): secrets never reach ``results.json``.
    """

    def __init__(self, output_dir: str | Path, *, config: Mapping[str, Any] | None = None, method: str = "") -> None:
        self.output_dir = Path(output_dir)
        self.config = redact_config(config or {})
        self.method = method
        self.rows: list[dict[str, Any]] = []
        #: The request set ``write()`` and ``print_summary()`` summarise (forgetting runs: ``"old"``).
        self.summary_set = "all"
        self.started = time.perf_counter()

    def record(self, server_round: int, metrics: Mapping[str, Any], *, request_set: str = "all",
               method: str | None = None) -> None:
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.rows.append({"round": int(server_round), "method": method or self.method,
                                  "request_set": request_set, "metric": metric, "value": float(value)})

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["round", "method", "request_set", "metric", "value"])

    def summary(self, request_set: str = "all") -> pd.DataFrame:
        """Wide table of the last round's metrics per method."""
        frame = self.table()
        frame = frame[frame.request_set == request_set]
        if frame.empty:
            return frame
        last = frame[frame["round"] == frame.groupby("method")["round"].transform("max")]
        wide = last.pivot_table(index="method", columns="metric", values="value", aggfunc="last")
        ordered = [m for m in METRIC_ORDER if m in wide.columns] + [m for m in wide.columns if m not in METRIC_ORDER]
        return wide[ordered]

    def write(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        frame = self.table()
        atomic_write_bytes(self.output_dir / "results.csv", frame.to_csv(index=False).encode())
        try:
            atomic_write_bytes(self.output_dir / "results.parquet", frame.to_parquet(index=False))
        except (ImportError, ValueError) as err:  # pyarrow missing: CSV and JSON still hold everything
            log.warning("results.parquet not written: %s", err)
        summary = self.summary(self.summary_set)
        atomic_write_json(self.output_dir / "results.json", {
            "config": redact_config(self.config),  # again: a caller may have set writer.config itself "rows": self.rows, "seconds": time.perf_counter() - self.started,
            "summary": {method: {k: float(v) for k, v in row.items()} for method, row in summary.iterrows()},
        })
        return self.output_dir

    def print_summary(self, title: str = "fedke results") -> str:
        summary = self.summary(self.summary_set)
        text = f"{title}\n{summary.round(2).to_string() if not summary.empty else '(no metrics)'}\n" \
               f"written to {self.output_dir.resolve()}"
        print(text, flush=True)
        return text


def display_name(method: str) -> str:
    """``collabedit`` -> ``CollabEdit``, ``global`` -> ``GlobalEdit``, ... (names in tables and plots)."""
    return METHOD_NAMES.get(method, method)


def read_results(path: str | Path) -> pd.DataFrame:
    """A results table written by :class:`ResultsWriter`: ``path`` is its ``output-dir`` (the
    Parquet file if there is one, else the CSV) or either file.

    The CSV is read with pandas' NA strings off: the metric ``NA`` (neighbourhood accuracy) is a
    name, not a missing value, and ``pd.read_csv`` alone would turn it into NaN.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet" if (path / "results.parquet").is_file() else path / "results.csv"
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"method": str, "request_set": str,
                                                                          "metric": str})

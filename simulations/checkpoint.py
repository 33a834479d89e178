"""Checkpoint and resume of a multi-round run: the server's state after every round (safetensors + JSON).

A long collaborative-editing run (hundreds of rounds) must survive a crash. After every round the
server writes, into ``checkpoint-dir``:

* ``state-<round>.safetensors``: float64 arrays — the strategy's cumulative update per edited
  layer (``global_update/<layer>``), CollabEdit's running sum of merged ``K K^T``
  (``kkt_total/<layer>``, what the dynamic covariance of eq. 7 needs), and the RNG states that are
  arrays (``rng/torch``, ``rng/numpy_keys``);
* ``checkpoint.json``: the format and version, the completed round and ``num-rounds``, whether the
  run finished, the config fingerprint and the config itself (to name what differs), the strategy's
  metadata (its ``state_dict()["meta"]``: ``rounds_merged``, per-round merge metrics,
  hyperparameters), the metrics table so far (tidy long rows, columnar), the rest of the RNG
  states (Python's ``random``, NumPy's position), and the name and SHA-256 of the safetensors file.

Writes are atomic and ordered: the safetensors file is written (temp file + rename) under a new
name first; ``checkpoint.json``, written the same way, is the commit point; only then is the
previous round's safetensors file deleted. A crash at any moment leaves the last complete round
readable. No pickle anywhere.

Resume policy (:func:`resume_point`): with ``resume = false`` an existing checkpoint is never
overwritten (the run is refused: resume it or choose another directory); with ``resume = true``
the run continues after the last complete round, and is refused with a clear message when the
checkpoint belongs to a different config (the differing keys are named) or the run already
finished. ``checkpoint-dir``, ``resume``, ``output-dir`` and ``cache-dir`` do not enter the
fingerprint (where things are written is not what is computed).

Both loops use it: :func:`fedke.simulations.multiround.run_multiround` (in process) and the
Flower ServerApp, through :class:`ResumableStrategy`, which shifts Flower's round numbers by the
rounds already done and saves at the end of every round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.server.strategy import Strategy

from fedke.cache import atomic_write_bytes

from .scenario import Scenario

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedke.run_checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
#: Run-config keys that say where things go, not what is computed: left out of the fingerprint.
RUN_CONTROL_KEYS = ("checkpoint_dir", "resume", "output_dir", "cache_dir")
ROW_COLUMNS = ("round", "method", "request_set", "metric", "value")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: another config, a finished run, or a damaged file."""


# ----------------------------------------------------------------------------- fingerprint


def fingerprint_config(scenario: Scenario) -> dict[str, Any]:
    """The settings that determine a run's results (every key but :data:`RUN_CONTROL_KEYS`)."""
    return {key: value for key, value in sorted(asdict(scenario).items()) if key not in RUN_CONTROL_KEYS}


def run_fingerprint(scenario: Scenario) -> str:
    """SHA-256 (first 16 hex digits) of :func:`fingerprint_config` as canonical JSON."""
    text = json.dumps(fingerprint_config(scenario), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The process's global RNG states (torch CPU, NumPy legacy, Python) as arrays + JSON."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    arrays = {"rng/torch": torch.get_rng_state().numpy().copy(), "rng/numpy_keys": np.asarray(keys, dtype=np.uint32)}
    meta = {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [int(version), [int(v) for v in internal], gauss_next]}
    return arrays, meta


def restore_rng(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import torch

    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng/torch"], dtype=np.uint8)))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(arrays["rng/numpy_keys"], dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- save / load


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for what each part is)."""

    directory: Path
    round: int
    num_rounds: int
    finished: bool
    fingerprint: str
    config: dict[str, Any]
    strategy_state: dict[str, Any]  # {"arrays": {...}, "meta": {...}}, for load_state_dict
    rows: list[dict[str, Any]]
    rng_arrays: dict[str, np.ndarray]
    rng_meta: dict[str, Any]
    extra: dict[str, Any]


def _rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    return {column: [row[column] for row in rows] for column in ROW_COLUMNS}


def _columns_to_rows(columns: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    lengths = {len(columns.get(column, ())) for column in ROW_COLUMNS}
    if len(lengths) != 1:
        raise CheckpointError(f"metrics columns of unequal lengths {sorted(lengths)}")
    return [dict(zip(ROW_COLUMNS, values)) for values in zip(*(columns[c] for c in ROW_COLUMNS))]


def _state_name(server_round: int) -> str:
    return f"state-{server_round:06d}.safetensors"


def save_checkpoint(directory: str | Path, scenario: Scenario, strategy: Any, server_round: int,
                    rows: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the state after ``server_round`` atomically; returns the path of ``checkpoint.json``.

    ``strategy`` is a :class:`fedke.strategies.EditMergeStrategy` (its ``state_dict()``); ``rows``
    the tidy metrics rows so far (``round, method, request_set, metric, value``).
    """
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = strategy.state_dict()
    rng_arrays, rng_meta = capture_rng()
    arrays = {**{key: np.ascontiguousarray(value) for key, value in state["arrays"].items()}, **rng_arrays}
    blob = save(arrays, metadata={"format": CHECKPOINT_FORMAT, "round": str(int(server_round))})
    name = _state_name(server_round)
    atomic_write_bytes(directory / name, blob)
    previous = load_manifest(directory)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "round": int(server_round),
        "num_rounds": int(scenario.num_rounds),
        "finished": int(server_round) >= scenario.num_rounds,
        "fingerprint": run_fingerprint(scenario),
        "config": fingerprint_config(scenario),
        "arrays_file": name,
        "arrays_sha256": hashlib.sha256(blob).hexdigest(),
        "strategy_meta": state["meta"],
        "rows": _rows_to_columns(rows),
        "rng": rng_meta,
        "extra": dict(extra or {}),
    }
    # compact JSON: rewritten every round, it holds every metrics row so far (35k rows at round 1000)
    atomic_write_bytes(directory / CHECKPOINT_JSON, json.dumps(manifest, separators=(",", ":")).encode())
    if previous is not None and previous.get("arrays_file") not in (None, name):
        (directory / previous["arrays_file"]).unlink(missing_ok=True)
    return directory / CHECKPOINT_JSON


def load_manifest(directory: str | Path) -> dict[str, Any] | None:
    """``checkpoint.json`` of ``directory`` as a dict, None if there is none."""
    path = Path(directory) / CHECKPOINT_JSON
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fedke run checkpoint (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')!r}; "
                              f"this fedke reads version {CHECKPOINT_VERSION}")
    return manifest


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The last complete checkpoint in ``directory``; None if there is none; CheckpointError if damaged."""
    from safetensors.numpy import load

    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest is None:
        return None
    path = directory / manifest["arrays_file"]
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{directory / CHECKPOINT_JSON} names {path.name}, which cannot be read ({err})") from None
    if hashlib.sha256(blob).hexdigest() != manifest["arrays_sha256"]:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in {CHECKPOINT_JSON}: the checkpoint is damaged")
    arrays = load(blob)
    rng_arrays = {key: value for key, value in arrays.items() if key.startswith("rng/")}
    state_arrays = {key: value for key, value in arrays.items() if not key.startswith("rng/")}
    return Checkpoint(
        directory=directory,
        round=int(manifest["round"]),
        num_rounds=int(manifest["num_rounds"]),
        finished=bool(manifest["finished"]),
        fingerprint=str(manifest["fingerprint"]),
        config=dict(manifest["config"]),
        strategy_state={"arrays": state_arrays, "meta": manifest["strategy_meta"]},
        rows=_columns_to_rows(manifest["rows"]),
        rng_arrays=rng_arrays,
        rng_meta=manifest["rng"],
        extra=dict(manifest.get("extra", {})),
    )


# ----------------------------------------------------------------------------- resume policy


def check_resumable(checkpoint: Checkpoint, scenario: Scenario) -> None:
    """CheckpointError unless ``scenario`` may continue ``checkpoint`` (same config, not finished)."""
    where = checkpoint.directory / CHECKPOINT_JSON
    if checkpoint.fingerprint != run_fingerprint(scenario):
        current = fingerprint_config(scenario)
        differing = sorted(key for key in set(current) | set(checkpoint.config)
                           if current.get(key, "<absent>") != checkpoint.config.get(key, "<absent>"))
        details = ", ".join(f"{key.replace('_', '-')}: checkpoint {checkpoint.config.get(key, '<absent>')!r}, "
                            f"now {current.get(key, '<absent>')!r}" for key in differing)
        raise CheckpointError(f"refusing to resume {where}: it was written by a run with a different config "
                              f"({details or 'fingerprint differs'}). Resume with the same config, or use another "
                              "checkpoint-dir for a new run.")
    if checkpoint.finished or checkpoint.round >= scenario.num_rounds:
        raise CheckpointError(f"refusing to resume {where}: the run already finished (round {checkpoint.round} of "
                              f"{checkpoint.num_rounds}); there is nothing left to run. Its results are in the "
                              "checkpoint's metrics; start a new run in another checkpoint-dir.")


def resume_point(scenario: Scenario) -> Checkpoint | None:
    """The checkpoint to continue, under the policy of the module docstring; None to start afresh."""
    if not scenario.checkpoint_dir:
        return None
    checkpoint = load_checkpoint(scenario.checkpoint_dir)
    if checkpoint is None:
        if scenario.resume:
            log.info("no checkpoint in %s yet: starting the run from round 1", scenario.checkpoint_dir)
        return None
    if not scenario.resume:
        raise CheckpointError(f"{checkpoint.directory / CHECKPOINT_JSON} already holds a run (round {checkpoint.round} "
                              f"of {checkpoint.num_rounds}); set resume = true to continue it, or choose another "
                              "checkpoint-dir (it is never overwritten)")
    check_resumable(checkpoint, scenario)
    return checkpoint


def restore(checkpoint: Checkpoint, strategy: Any, writer: Any | None = None) -> int:
    """Load ``checkpoint`` into ``strategy`` (and the metrics into ``writer.rows``), restore the RNGs.

    Returns the round to continue from (the checkpoint's round + 1).
    """
    strategy.load_state_dict(checkpoint.strategy_state)
    if writer is not None:
        writer.rows = [dict(row) for row in checkpoint.rows]
    restore_rng(checkpoint.rng_arrays, checkpoint.rng_meta)
    log.info("resumed %s after round %d of %d", checkpoint.directory, checkpoint.round, checkpoint.num_rounds)
    return checkpoint.round + 1


# ----------------------------------------------------------------------------- Flower ServerApp


class ResumableStrategy(Strategy):
    """A fedke strategy that continues a checkpointed run under Flower's legacy server loop.

    Flower numbers a run's rounds from 1; after a resume the ServerApp runs only the rounds left
    (``ServerConfig(num_rounds = num-rounds - done)``) and this wrapper adds ``done`` to every
    round number it passes on, so clients edit the right round's requests and the results keep
    their true round. The checkpoint is saved after the server's evaluation of every round (the
    end of a round when federated evaluation is off) and again after the federated evaluation.
    """

    def __init__(self, inner: Any, scenario: Scenario, writer: Any, rounds_done: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.scenario = scenario
        self.writer = writer
        self.rounds_done = int(rounds_done)

    def __repr__(self) -> str:
        return f"ResumableStrategy({self.inner!r}, rounds_done={self.rounds_done})"

    def _round(self, server_round: int) -> int:
        return server_round + self.rounds_done if server_round > 0 else 0

    def save(self, server_round: int) -> None:
        save_checkpoint(self.scenario.checkpoint_dir, self.scenario, self.inner, server_round,
                        self.writer.rows if self.writer is not None else [])

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(self._round(server_round), parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.inner.aggregate_fit(self._round(server_round), results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(self._round(server_round), parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        outcome = self.inner.aggregate_evaluate(self._round(server_round), results, failures)
        if server_round > 0:
            self.save(self._round(server_round))
        return outcome

    def evaluate(self, server_round, parameters):
        outcome = self.inner.evaluate(self._round(server_round), parameters)
        if server_round > 0:
            self.save(self._round(server_round))
        return outcome

"""Checkpoint and resume of a multi-round run: the server's state after every round (safetensors + JSON).

A long collaborative-editing run (hundreds of rounds) must survive a crash. After every round the
server writes, into ``checkpoint-dir``:

* ``state-<round>.safetensors``: float64 arrays — the strategy's cumulative update per edited
  layer (``global_update/<layer>``), CollabEdit's running sum of merged ``K K^T``
  (``kkt_total/<layer>``, what the dynamic covariance of eq. 7 needs), and the RNG states that are
  arrays (``rng/torch``, ``rng/numpy_keys``);
* ``metrics.jsonl``: an append-only log, one compact JSON line per round holding only what that
  round added: its metrics rows (tidy long rows, columnar) and the strategy's per-round merge
  metrics (``round_metrics``);
* ``checkpoint.json``: the format and version, the completed round and ``num-rounds``, whether the
  run finished, the config fingerprint and the config itself (to name what differs; secrets
  redacted, see below), the strategy's metadata but its per-round metrics (``rounds_merged``,
  hyperparameters), the rest of the RNG states (Python's ``random``, NumPy's position), the name
  and SHA-256 of the safetensors file, the committed prefix of the metrics log: its length in
  bytes, lines, rows, and a hash chain over its lines (``h_i = SHA-256(h_{i-1} || line_i)``,
  ``h_0`` empty), and ``checksum_sha256``: the SHA-256 of everything else in the file as canonical
  JSON (sorted keys, no spaces), so it covers the file hashes too. It is verified on every load; a
  mismatch (a flipped digit in an RNG state or ``rounds_merged``) is a CheckpointError naming the
  file. (An unkeyed checksum catches damage and careless edits, not a forger who recomputes it.)

Secrets: the config stored and fingerprinted is redacted
(:func:`fedke.simulations.results.redact_config`): ``conflict-secret`` enters as ``"<redacted>"``
when set (``""`` when not), so a checkpoint records whether the run's HMAC conflict tokens were
keyed, never the key nor a hash of it. The key changes no result (the tokens only have to match
within a run, and the server's conflict desk is not checkpointed), so a run may be resumed with
another one.

Older checkpoints: version 2 (before the checksum) is still read, with a warning that its
``checkpoint.json`` cannot be verified (its fingerprint, which hashed the raw secret, is checked
as it was computed then); the next save writes version 3 and drops the secret that version 2
stored in clear. A version-2 file that carries a checksum is verified like version 3.

Every file a round writes has a size independent of the round number, so a checkpoint costs the
same at round 1,000 as at round 1 (the log is read whole only on resume).

Writes are ordered: the safetensors file is written atomically (temp file + rename) under a new
name; the round's line is appended to the log (after truncating it to the committed prefix, which
drops the line of a round that crashed before its commit) and fsync'd; ``checkpoint.json``,
written atomically, is the commit point; only then are other ``state-*.safetensors`` files and
temp files of interrupted writes deleted (at most one stale arrays file survives a crash). A
crash at any moment leaves the last complete round readable: log bytes beyond the committed
prefix (a torn last line, or the line of an uncommitted round) are ignored on load and cut at the
next save. No pickle anywhere.

The resume policy and the Flower adapter that saves after every edit round live in
:mod:`fedke.simulations.resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedke.cache import atomic_write_bytes

from .results import redact_config
from .scenario import Scenario

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedke.run_checkpoint"
CHECKPOINT_VERSION = 3  # 2: metrics in the append-only log metrics.jsonl; 3: checksum_sha256, secrets redacted
#: Versions this fedke reads (2 without a checksum, with a warning; see the module docstring).
READABLE_VERSIONS = (2, 3)
CHECKSUM_KEY = "checksum_sha256"
CHECKPOINT_JSON = "checkpoint.json"
METRICS_LOG = "metrics.jsonl"
#: Run-config keys that say where things go, not what is computed: left out of the fingerprint.
#: (``streaming_aggregation`` and ``flower_api`` pick the server loop; every loop computes the same merge.)
RUN_CONTROL_KEYS = ("checkpoint_dir", "resume", "output_dir", "cache_dir", "streaming_aggregation", "flower_api")
ROW_COLUMNS = ("round", "method", "request_set", "metric", "value")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: another config, a finished run, or a damaged file."""


# ----------------------------------------------------------------------------- fingerprint


def fingerprint_config(scenario: Scenario) -> dict[str, Any]:
    """The settings that determine a run's results (every key but :data:`RUN_CONTROL_KEYS`), secrets redacted.

    ``layerwise`` enters as what it decides: ``layerwise = True`` when the run is layer-wise, absent
    otherwise (``"auto"`` with the decoupled mode and ``"false"`` compute the same, as did runs
    checkpointed before the key existed); ``passes`` enters only when it is not 1. A secret
    (``conflict_secret``) enters as whether it is set (:func:`fedke.simulations.results.redact_config`).
    """
    return redact_config(_unredacted_fingerprint_config(scenario))


def _unredacted_fingerprint_config(scenario: Scenario) -> dict[str, Any]:
    """:func:`fingerprint_config` with secrets in clear: only to check a version-2 checkpoint's fingerprint."""
    config = {key: value for key, value in sorted(asdict(scenario).items()) if key not in RUN_CONTROL_KEYS}
    del config["layerwise"]
    if scenario.layerwise_enabled:
        config["layerwise"] = True
    if config.get("passes") == 1:  # one pass is MEMIT, as in runs checkpointed before the key existed
        del config["passes"]
    return dict(sorted(config.items()))


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def run_fingerprint(scenario: Scenario) -> str:
    """SHA-256 (first 16 hex digits) of :func:`fingerprint_config` as canonical JSON (no secret in it)."""
    return _config_hash(fingerprint_config(scenario))


def _fingerprint_for_version(scenario: Scenario, version: int) -> str:
    """The fingerprint a checkpoint of ``version`` holds for ``scenario`` (version 2 hashed secrets in clear)."""
    return _config_hash(_unredacted_fingerprint_config(scenario)) if version == 2 else run_fingerprint(scenario)


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
    version: int
    round: int
    num_rounds: int
    finished: bool
    fingerprint: str
    config: dict[str, Any]  # secrets redacted
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


def _canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON: first through JSON and back (so non-string keys become the
    strings a loaded file holds, and sorting never compares an int with a str), then sorted keys,
    no spaces, ASCII."""
    normalised = json.loads(json.dumps(value))
    return json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``manifest`` without its checksum field, as canonical JSON (sorted keys, no
    spaces, ASCII). Floats round-trip through JSON exactly, so a loaded manifest gives the same."""
    return hashlib.sha256(_canonical_json({k: v for k, v in manifest.items() if k != CHECKSUM_KEY})).hexdigest()


def checkpoint_files(directory: str | Path) -> list[str]:
    """The names of the files in ``directory`` that a checkpoint writes besides ``checkpoint.json``
    (arrays files, the metrics log, temp files of interrupted writes), sorted; [] if none or no directory."""
    directory = Path(directory)
    names: set[str] = set()
    for pattern in ("state-*.safetensors", METRICS_LOG, ".state-*.tmp", f".{CHECKPOINT_JSON}.*.tmp"):
        names.update(path.name for path in directory.glob(pattern) if path.is_file())
    return sorted(names)


def _state_name(server_round: int) -> str:
    return f"state-{server_round:06d}.safetensors"


EMPTY_LOG = {"file": METRICS_LOG, "bytes": 0, "lines": 0, "rows": 0, "round_metrics": 0, "chain_sha256": ""}


def _chain(previous: str, line: bytes) -> str:
    """One link of the metrics log's hash chain: ``SHA-256(previous_hex || line)`` (line with its newline)."""
    return hashlib.sha256(previous.encode() + line).hexdigest()


def _log_line(server_round: int, rows: Sequence[Mapping[str, Any]], round_metrics: Sequence[Mapping[str, Any]]) -> bytes:
    """The metrics log's line of one round: what the round added, compact JSON + newline."""
    entry = {"round": int(server_round), "rows": _rows_to_columns(rows), "round_metrics": [dict(m) for m in round_metrics]}
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _append_committed(path: Path, committed_bytes: int, line: bytes) -> None:
    """Cut ``path`` to its committed prefix (dropping a torn or uncommitted tail), append ``line``, fsync."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size < committed_bytes:
            raise CheckpointError(f"{path} holds {size} bytes, fewer than the {committed_bytes} committed in "
                                  f"{CHECKPOINT_JSON}: the checkpoint is damaged")
        if size > committed_bytes:
            os.ftruncate(fd, committed_bytes)
        os.lseek(fd, committed_bytes, os.SEEK_SET)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(directory: Path, keep: str) -> None:
    """After a commit: other rounds' arrays files and temp files of interrupted atomic writes."""
    for path in directory.glob("state-*.safetensors"):
        if path.name != keep:
            path.unlink(missing_ok=True)
    for pattern in (".state-*.tmp", f".{CHECKPOINT_JSON}.*.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, scenario: Scenario, strategy: Any, server_round: int,
                    rows: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the state after ``server_round``; returns the path of ``checkpoint.json`` (the commit point).

    ``strategy`` is a :class:`fedke.strategies.EditMergeStrategy` (its ``state_dict()``); ``rows``
    the tidy metrics rows so far (``round, method, request_set, metric, value``), of which only
    those past the committed ones are written (to the round's line of ``metrics.jsonl``), as are
    only the strategy's new ``round_metrics``: the bytes written do not grow with the round.
    ``server_round`` must exceed the committed round (a round is saved once).
    """
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = load_manifest(directory)
    committed = dict(previous["metrics_log"]) if previous is not None else dict(EMPTY_LOG)
    if previous is not None and int(server_round) <= int(previous["round"]):
        raise CheckpointError(f"{directory / CHECKPOINT_JSON} already holds round {previous['round']}; "
                              f"round {server_round} cannot be saved after it (a round is saved once)")
    if len(rows) < committed["rows"]:
        raise CheckpointError(f"{len(rows)} metrics rows given, but the checkpoint already holds {committed['rows']}: "
                              "pass every row of the run so far")
    state = strategy.state_dict()
    meta = dict(state["meta"])
    round_metrics = list(meta.pop("round_metrics", []))
    if len(round_metrics) < committed["round_metrics"]:
        raise CheckpointError(f"the strategy has {len(round_metrics)} round_metrics entries, but the checkpoint already "
                              f"holds {committed['round_metrics']}")
    rng_arrays, rng_meta = capture_rng()
    arrays = {**{key: np.ascontiguousarray(value) for key, value in state["arrays"].items()}, **rng_arrays}
    blob = save(arrays, metadata={"format": CHECKPOINT_FORMAT, "round": str(int(server_round))})
    name = _state_name(server_round)
    atomic_write_bytes(directory / name, blob)
    line = _log_line(server_round, rows[committed["rows"]:], round_metrics[committed["round_metrics"]:])
    _append_committed(directory / METRICS_LOG, committed["bytes"], line)
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
        "strategy_meta": meta,
        "metrics_log": {
            "file": METRICS_LOG,
            "bytes": committed["bytes"] + len(line),
            "lines": committed["lines"] + 1,
            "rows": len(rows),
            "round_metrics": len(round_metrics),
            "chain_sha256": _chain(committed["chain_sha256"], line),
        },
        "rng": rng_meta,
        "extra": redact_config(extra or {}),
    }
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    atomic_write_bytes(directory / CHECKPOINT_JSON, json.dumps(manifest, separators=(",", ":")).encode())
    _remove_stale(directory, keep=name)
    return directory / CHECKPOINT_JSON


def load_manifest(directory: str | Path) -> dict[str, Any] | None:
    """``checkpoint.json`` of ``directory`` as a dict, its checksum verified; None if the directory
    holds no checkpoint at all.

    CheckpointError, naming the file: checkpoint files without ``checkpoint.json`` (it was deleted,
    or the run crashed before its first commit), a file that is not JSON, not a fedke checkpoint,
    of a version this fedke does not read, or whose checksum does not match its content. A
    version-2 file without a checksum is returned with a warning (see the module docstring).
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_JSON
    if not path.exists():
        leftovers = checkpoint_files(directory)
        if not leftovers:
            return None
        shown = ", ".join(leftovers[:6]) + (f" and {len(leftovers) - 6} more" if len(leftovers) > 6 else "")
        raise CheckpointError(
            f"{directory} holds checkpoint files ({shown}) but no {CHECKPOINT_JSON}, the file that commits a "
            f"round: {path} is missing (deleted, or the run crashed before its first round was committed). The "
            "checkpoint cannot be resumed, and it is not restarted from round 1 over these files: delete them "
            "(or choose another checkpoint-dir) to start afresh")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fedke run checkpoint (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this fedke reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if CHECKSUM_KEY in manifest or version != 2:
        recorded = manifest.get(CHECKSUM_KEY)
        if recorded is None:
            raise CheckpointError(f"{path} has no checksum ({CHECKSUM_KEY}), which version {version} checkpoints "
                                  "carry: the file was altered or damaged; the checkpoint cannot be resumed")
        if recorded != manifest_checksum(manifest):
            raise CheckpointError(f"{path} does not match its checksum ({CHECKSUM_KEY}): the file was altered or "
                                  "damaged after it was written (e.g. a digit of an RNG state or rounds_merged); "
                                  "the checkpoint cannot be resumed")
    else:
        log.warning("%s is a version-2 checkpoint with no checksum: its content cannot be verified (the arrays "
                    "file and the metrics log still are); the next save writes version %d", path, CHECKPOINT_VERSION)
    return manifest


def read_metrics_log(directory: str | Path, manifest: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The committed prefix of the metrics log: (metrics rows, the strategy's round_metrics).

    Bytes past the prefix (a torn last line, a round that crashed before its commit) are ignored;
    a prefix that is short, does not parse, or breaks the hash chain is a CheckpointError.
    """
    info = manifest["metrics_log"]
    path = Path(directory) / info["file"]
    damaged = f"{path} does not match the metrics log committed in {CHECKPOINT_JSON}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(int(info["bytes"]))
    except FileNotFoundError:
        if info["bytes"] == 0:
            return [], []
        raise CheckpointError(f"{damaged}: the file is missing") from None
    except OSError as err:
        raise CheckpointError(f"{damaged}: {err}") from None
    if len(data) != info["bytes"] or (data and not data.endswith(b"\n")):
        raise CheckpointError(f"{damaged}: {len(data)} bytes of the committed {info['bytes']}, or a torn committed line")
    rows: list[dict[str, Any]] = []
    round_metrics: list[dict[str, Any]] = []
    chain, last_round = "", 0
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]  # data ends with a newline (checked)
    for number, line in enumerate(lines, 1):
        chain = _chain(chain, line)
        try:
            entry = json.loads(line)
            line_round = int(entry["round"])
            rows.extend(_columns_to_rows(entry["rows"]))
            round_metrics.extend(dict(m) for m in entry["round_metrics"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{damaged}: line {number} is not a round's entry ({err})") from None
        if line_round <= last_round:
            raise CheckpointError(f"{damaged}: line {number} holds round {line_round} after round {last_round}")
        last_round = line_round
    if chain != info["chain_sha256"]:
        raise CheckpointError(f"{damaged}: its SHA-256 chain differs; the checkpoint is damaged")
    if (len(lines), len(rows), len(round_metrics)) != (info["lines"], info["rows"], info["round_metrics"]) or \
            (lines and last_round != int(manifest["round"])):
        raise CheckpointError(f"{damaged}: {len(lines)} lines, {len(rows)} rows, {len(round_metrics)} round_metrics "
                              f"up to round {last_round}")
    return rows, round_metrics


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The last complete checkpoint in ``directory``; None if there is none; CheckpointError if damaged."""
    from safetensors.numpy import load

    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest is None:
        return None
    try:
        path = directory / Path(str(manifest["arrays_file"])).name
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{directory / CHECKPOINT_JSON} names {path.name}, which cannot be read ({err})") from None
        if hashlib.sha256(blob).hexdigest() != manifest["arrays_sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded in {CHECKPOINT_JSON}: the checkpoint is damaged")
        arrays = load(blob)
        rng_arrays = {key: value for key, value in arrays.items() if key.startswith("rng/")}
        state_arrays = {key: value for key, value in arrays.items() if not key.startswith("rng/")}
        rows, round_metrics = read_metrics_log(directory, manifest)
        return Checkpoint(
            directory=directory,
            version=int(manifest["version"]),
            round=int(manifest["round"]),
            num_rounds=int(manifest["num_rounds"]),
            finished=bool(manifest["finished"]),
            fingerprint=str(manifest["fingerprint"]),
            config=redact_config(manifest["config"]),  # a version-2 file holds secrets in clear
            strategy_state={"arrays": state_arrays,
                            "meta": {**manifest["strategy_meta"], "round_metrics": round_metrics}},
            rows=rows,
            rng_arrays=rng_arrays,
            rng_meta=manifest["rng"],
            extra=redact_config(manifest.get("extra", {})),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{directory / CHECKPOINT_JSON} lacks or has a malformed field "
                              f"({type(err).__name__}: {err}); the checkpoint is damaged") from None

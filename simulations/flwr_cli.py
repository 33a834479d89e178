"""Talking to Flower's ``flwr`` command line: run-config values in its syntax, its output parsed,
its environment, and the app's ``pyproject.toml`` / ``-c`` overrides read.

Pure text in, text out, except :func:`run_flwr` and :func:`query_status`, which run one short
``flwr`` command. :mod:`fedke.simulations.launch` (the simulation engine) and
:mod:`fedke.simulations.deploy` (the deployment engine) both build on it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tomli comes with flwr)
    import tomli as tomllib  # type: ignore[no-redef]

from .processes import executable, scripts_dir

__all__ = [
    "OverrideError",
    "RunFailed",
    "RunResult",
    "RunTimedOut",
    "app_config",
    "check_run_config_keys",
    "flwr_env",
    "format_config_args",
    "format_config_value",
    "load_run_config",
    "parse_flwr_list_json",
    "parse_run_id",
    "query_status",
    "read_overrides",
    "run_flwr",
    "split_status",
    "strip_ansi",
]

#: ``status`` / ``sub_status`` of a successful run (``flwr list`` shows ``finished:completed``).
STATUS_FINISHED = "finished"
SUB_STATUS_COMPLETED = "completed"
SUB_STATUS_FAILED = "failed"
SUB_STATUS_STOPPED = "stopped"

#: Lines of log shown in :class:`RunFailed` messages.
LOG_TAIL_LINES = 60


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_LOGSTREAM = re.compile(r"Starting logstream for run_id `(\d+)`")


# --------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RunResult:
    """The outcome of one :func:`run_app` call.

    ``status``/``sub_status`` are Flower's (``"finished"``/``"completed"`` on success; the other
    sub-statuses are ``"failed"`` and ``"stopped"``); ``details`` is Flower's status detail (for a
    failure, e.g. ``"Simulation failed with exception: ..."``). ``seconds`` is the wall-clock time
    of the whole call (SuperLink start-up included); ``log_text`` is the output of ``flwr run
    --stream`` without colour codes.
    """

    run_id: int | None
    status: str
    sub_status: str
    seconds: float
    log_text: str
    details: str = ""
    flwr_home: str | None = None

    @property
    def ok(self) -> bool:
        """True when the run finished and completed."""
        return self.status == STATUS_FINISHED and self.sub_status == SUB_STATUS_COMPLETED

    @property
    def status_text(self) -> str:
        """``status:sub_status`` as ``flwr list`` shows it."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text.rstrip("\n").splitlines()[-lines:])


class RunFailed(RuntimeError):
    """The run did not finish with ``finished:completed`` (or could not be started).

    ``result`` holds the :class:`RunResult` (status, details, full log).
    """

    def __init__(self, result: RunResult, reason: str | None = None):
        self.result = result
        head = reason or f"Flower run {result.run_id} ended with status {result.status_text!r}"
        if result.details and result.details != "N/A":
            head += f": {result.details}"
        super().__init__(f"{head}\n--- last lines of the log ---\n{result.log_tail()}")


class RunTimedOut(RunFailed):
    """The run did not finish within ``timeout_s`` (it was stopped)."""


# ------------------------------------------------------------------------------ config formatting
def format_config_value(value: object) -> str:
    """One value in the TOML syntax that ``flwr run --run-config`` parses.

    Flower splits each ``--run-config`` argument with the pattern
    ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` and parses the values as TOML
    (``flwr.common.config.parse_config_args``): bools are ``true``/``false``, numbers bare, strings
    quoted. Strings become TOML literal strings (``'...'``) or, when they contain a ``'``, basic
    strings with escapes; a string with both quote kinds cannot pass that pattern.
    """
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(value, str):
        has_control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
        if "'" not in value and not has_control:
            return f"'{value}'"
        if '"' not in value:
            escaped = []
            for c in value:
                if c == "\\":
                    escaped.append("\\\\")
                elif ord(c) < 0x20 or ord(c) == 0x7F:
                    short = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
                    escaped.append(short.get(c, f"\\u{ord(c):04x}"))
                else:
                    escaped.append(c)
            return '"' + "".join(escaped) + '"'
        raise ValueError(
            f"run-config string {value!r} contains both ' and \": "
            "flwr's --run-config cannot carry it"
        )
    raise TypeError(
        f"run-config values must be bool, int, float or str, not {type(value).__name__} ({value!r})"
    )


def format_config_args(config: Mapping[str, object] | None) -> list[str]:
    """``["key=value", ...]``, one ``--run-config``/``--federation-config`` argument per entry."""
    if not config:
        return []
    args = []
    for key, value in config.items():
        if not isinstance(key, str) or not _BARE_KEY.fullmatch(key):
            raise ValueError(f"invalid config key {key!r}: use letters, digits, '-', '_' and '.'")
        args.append(f"{key}={format_config_value(value)}")
    return args


# ----------------------------------------------------------------------------- output parsing
def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def parse_run_id(output: str) -> int | None:
    """The run id from ``flwr run`` output (``Successfully started run <id>``), or None."""
    text = strip_ansi(output)
    match = _RUN_STARTED.search(text) or _LOGSTREAM.search(text)
    return int(match.group(1)) if match else None


def split_status(status_text: str) -> tuple[str, str]:
    """``"finished:failed"`` -> ``("finished", "failed")``; ``"running"`` -> ``("running", "")``."""
    status, _, sub_status = status_text.strip().partition(":")
    return status, sub_status


def parse_flwr_list_json(text: str, run_id: int | None = None) -> dict:
    """The entry for ``run_id`` (or the newest run) from ``flwr list --format json`` output.

    That output is ``{"success": true, "runs": [{"run-id": "<id>", "status": "finished:completed",
    "status-details": "N/A", "elapsed": 12.1, ...}]}``, or ``{"success": false,
    "error-message": ...}`` on error. Raises ``LookupError`` when the run is not listed and
    ``RuntimeError`` for an error answer.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr list output: {text[-500:]!r}")
    payload = json.loads(text[start:])
    if not payload.get("success", False):
        raise RuntimeError(f"flwr list failed: {payload.get('error-message', payload)}")
    runs = payload.get("runs", [])
    if run_id is not None:
        for run in runs:
            if str(run.get("run-id")) == str(run_id):
                return run
        raise LookupError(f"run {run_id} not in flwr list output")
    if not runs:
        raise LookupError("flwr list shows no runs")
    return max(runs, key=lambda r: r.get("pending-at") or "")


# ------------------------------------------------------------------------------ the flwr command
def flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = os.pathsep.join([scripts_dir(), env.get("PATH", "")])
    return env


def run_flwr(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> str:
    """Run a short ``flwr`` command and return its stdout+stderr (never raises on exit code)."""
    try:
        done = subprocess.run(  # noqa: S603
            [executable("flwr"), *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return done.stdout
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        return out.decode(errors="replace") if isinstance(out, bytes) else out


def query_status(run_id: int, env: dict[str, str], cwd: Path) -> dict | None:
    # `flwr list` migrates a legacy pyproject.toml in its working directory: run it in FLWR_HOME.
    out = run_flwr(["list", "--run-id", str(run_id), "--format", "json"], env, cwd, 60)
    try:
        return parse_flwr_list_json(out, run_id)
    except (ValueError, LookupError, RuntimeError):
        return None


# -------------------------------------------------------------------------- run configs and -c
def flatten_table(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(flatten_table(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run_config(path: str | os.PathLike) -> dict[str, object]:
    """A run-config TOML file (e.g. a preset) as the flat dict :func:`run_app` takes.

    Nested tables become dotted keys, as ``flwr run --run-config file.toml`` does.
    """
    with Path(path).expanduser().open("rb") as fh:
        return flatten_table(tomllib.load(fh))


def app_config(app_dir: str | os.PathLike) -> dict[str, object]:
    """Validate the app's pyproject.toml; return its flattened ``[tool.flwr.app.config]`` (the
    run config's defaults). FileNotFoundError / ValueError name what is wrong."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"no pyproject.toml in {app_dir}")
    with pyproject.open("rb") as fh:
        config = tomllib.load(fh)
    flwr = config.get("tool", {}).get("flwr", {})
    if "app" not in flwr:
        raise ValueError(f"{pyproject} has no [tool.flwr.app] section")
    if "federations" in flwr:
        raise ValueError(
            f"{pyproject} has a legacy [tool.flwr.federations] section: `flwr run` (flwr>=1.41) "
            "would migrate it into $FLWR_HOME/config.toml and comment it out in pyproject.toml. "
            "Remove the section; pass the federation size with num_supernodes instead."
        )
    return flatten_table(flwr["app"].get("config", {}))


def check_run_config_keys(
    run_config: Mapping[str, object], defaults: Mapping[str, object], pyproject: Path
) -> None:
    """Flower refuses (only) keys missing from ``[tool.flwr.app.config]``, with no detail on the
    client side ("Invalid run configuration."): name them before starting anything."""
    unknown = sorted(k for k in run_config if k not in defaults)
    if unknown:
        raise ValueError(
            f"run-config keys {unknown} are not in [tool.flwr.app.config] of {pyproject} "
            f"(Flower rejects them); known keys: {sorted(defaults)}"
        )


class OverrideError(ValueError):
    """A ``-c`` argument that is neither ``key=value`` pairs nor a readable TOML file."""


_OVERRIDE_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")  # flwr's parse_config_args pattern


def read_overrides(arguments: Iterable[str] | None) -> dict[str, object]:
    """``-c`` arguments -> one flat dict, later ones overriding earlier ones.

    Each argument is a ``.toml`` file (e.g. a preset; nested tables become dotted keys, as
    ``flwr run --run-config file.toml`` does) or ``key=value`` pairs in Flower's syntax
    (``"num-clients=3 strategy='fedavg'"``: TOML values), so ``-c presets/tiny.toml -c num-rounds=1``
    works. A bare word is taken as a string (``strategy=fedavg``). ``fedke run`` and ``fedke compare``
    read ``-c`` through here. Raises
    :class:`OverrideError` naming the argument that is neither.
    """
    merged: dict[str, object] = {}
    for argument in arguments or []:
        text = argument.strip()
        if text.endswith(".toml"):
            if not Path(text).expanduser().is_file():
                raise OverrideError(f"-c {argument!r}: no such run-config file")
            try:
                merged.update(load_run_config(text))
            except tomllib.TOMLDecodeError as err:
                raise OverrideError(f"-c {argument!r}: not a valid TOML file ({err})") from None
            continue
        pairs = _OVERRIDE_PAIR.findall(text)
        leftover = _OVERRIDE_PAIR.sub("", text).strip()
        if not pairs or leftover:
            raise OverrideError(f"-c {argument!r}: expected key=value pairs (strings quoted: name='x') or a .toml "
                                f"file{f'; cannot read {leftover!r}' if leftover else ''}")
        for key, raw in pairs:
            merged[key] = _override_value(key, raw)
    return merged


def _override_value(key: str, raw: str) -> object:
    """One ``key=value`` value as TOML reads it (a bare word as a string); OverrideError names ``key``."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]*", raw) and raw.lower() not in ("nan", "inf"):
            return raw
        raise OverrideError(f"-c {key}={raw}: the value is not a TOML bool, number or string "
                            f"(quote strings: {key}='...')") from None

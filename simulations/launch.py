"""Run a Flower app with ``flwr run`` on a private, throw-away local SuperLink; check the result.

``flwr run .`` (flwr 1.41) is awkward to script: it exits 0 even when the run failed, it leaves a
detached local SuperLink running, it installs the app's dependencies per run by default, it shares
one SuperLink (fixed port 39091) and one ``~/.flwr`` between every caller, and it rewrites the
app's ``pyproject.toml`` when that has a legacy ``[tool.flwr.federations]`` section.
:func:`run_app` wraps it so that a run is one blocking call that either returns a
:class:`RunResult` with status ``finished:completed`` or raises :class:`RunFailed`:

1. a Flower home (``FLWR_HOME``) is made for the run: a temporary directory (deleted afterwards)
   unless ``flwr_home`` is given, so ``~/.flwr`` is never read or written;
2. a SuperLink is started by us on free loopback ports, exactly as ``flwr run`` would start its
   "local" one (``flower-superlink --insecure --simulation --isolation subprocess ...``) plus
   ``--disable-runtime-dependency-installation``. ``flwr run`` finds it healthy at
   ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and uses it instead of starting its own, so we hold its
   PID and parallel runs (other shells, other tests) never share a SuperLink;
3. ``flwr run <app> --federation-config num-supernodes=N -c k=v ... --stream`` runs in the
   foreground; its output (the ServerApp's logs and prints, the ClientApps' prints prefixed with
   ``(ClientAppActor pid=...)``) is echoed and kept;
4. the run's real final status comes from ``flwr list --run-id <id> --format json``
   (``finished:completed`` / ``finished:failed`` / ``finished:stopped``);
5. in a ``finally`` (also on timeout, error and Ctrl-C) the run is stopped if still going
   (``flwr stop``), the SuperLink gets SIGTERM (it then ends its ``flower-superexec`` and the
   ``flwr-simulation`` child), and any of its descendants (Ray included) still alive after a grace
   period get SIGKILL.

Environment set for all Flower processes: ``FLWR_HOME``, ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
``FLWR_LOCAL_CONTROL_API_PORT``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``,
``FLWR_DISABLE_UPDATE_CHECK=1`` and ``FLWR_TELEMETRY_ENABLED=0`` (no network), and the directory
of the running Python's scripts first on ``PATH`` (the SuperLink spawns ``flower-superexec`` and
``flwr-simulation`` by name).

The app directory is built into a FAB and installed into ``$FLWR_HOME/apps``; its components are
imported from there, so the app does not have to be pip-installed (fedke's own app imports the
installed ``fedke`` package). The simulation runs in the current working directory: relative paths
in the run config resolve against it.

Command line (exits 0 on success, 1 when the run failed or timed out, 130 on Ctrl-C)::

    python -m fedke.simulations.launch --num-supernodes 3 -c "num-clients=3" .
    python -m fedke.simulations.launch -n 10 -c 'strategy="fedavg" num-rounds=2' -c lam=300.0 .

Timings on a 2-core machine (flwr 1.41, Ray 2.55): SuperLink ready in about 3 s; a trivial app
with 2-3 supernodes and 1-2 rounds takes 14-16 s in ``flwr run`` (mostly Flower and Ray start-up,
also when the ServerApp fails at once); stopping the SuperLink takes about 1 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tomli comes with flwr)
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "OverrideError",
    "RunFailed",
    "RunResult",
    "RunTimedOut",
    "app_config",
    "format_config_args",
    "format_config_value",
    "load_run_config",
    "main",
    "parse_flwr_list_json",
    "parse_run_id",
    "read_overrides",
    "run_app",
    "split_status",
]

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------ process helpers
def _scripts_dir() -> str:
    return os.path.dirname(sys.executable)


def _executable(name: str) -> str:
    """``name`` next to the running Python (the venv's bin/), else on PATH."""
    candidate = os.path.join(_scripts_dir(), name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _children_map() -> dict[int, list[int]] | None:
    """pid -> child pids from /proc (None where there is no /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    if children is None:
        try:
            import psutil  # noqa: PLC0415 (optional, only without /proc)

            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except Exception:  # noqa: BLE001
            return []
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        return True


def _superlink_pids_on_port(port: int) -> list[int]:
    """PIDs of flower-superlink processes serving ``port`` (Linux; safety net, see run_app)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if any(a.endswith("flower-superlink") for a in args) and (
            f"--port={port}" in args
            or any(a == "--port" and b == str(port) for a, b in zip(args, args[1:]))
        ):
            pids.append(int(entry.name))
    return pids


def _stop_process_tree(
    pid: int, proc: subprocess.Popen | None = None, grace_s: float = 10.0
) -> None:
    """Stop ``pid`` and every process it started, escalating SIGTERM -> SIGTERM all -> SIGKILL.

    A SuperLink stops its ``flower-superexec`` on SIGTERM, but a ``flwr-simulation`` busy in a
    ClientApp (and its Ray processes) can outlive both, so the whole tree (as seen before and
    while stopping: orphans are re-parented to init) gets SIGTERM after ``grace_s / 2`` and
    SIGKILL after ``grace_s``.
    """
    tree = set(_descendants(pid))
    t0 = time.monotonic()

    def alive_members() -> list[int]:
        if proc is not None:
            proc.poll()  # reap our own child so it does not linger as a zombie
        if _alive(pid):
            tree.update(_descendants(pid))
            return [pid, *(p for p in tree if _alive(p))]
        return [p for p in tree if _alive(p)]

    def signal_all(pids: Iterable[int], sig: int) -> None:
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_until(deadline: float) -> list[int]:
        left = alive_members()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = alive_members()
        return left

    log.debug("SIGTERM %d (descendants %s)", pid, sorted(tree))
    signal_all([pid], signal.SIGTERM)
    left = wait_until(t0 + grace_s / 2)
    if left:
        log.debug("after %.1f s, SIGTERM to %s", time.monotonic() - t0, left)
        signal_all(left, signal.SIGTERM)
        left = wait_until(t0 + grace_s)
    if left:
        log.debug("after %.1f s, SIGKILL to %s", time.monotonic() - t0, left)
        signal_all(left, signal.SIGKILL)
        wait_until(time.monotonic() + 5)
    else:
        log.debug("process tree of %d stopped in %.1f s", pid, time.monotonic() - t0)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
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
    env["PATH"] = os.pathsep.join([_scripts_dir(), env.get("PATH", "")])
    return env


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def processes_with_flwr_home(home: str | os.PathLike) -> set[int]:
    """Live (non-zombie) processes whose environment has FLWR_HOME=<home>: everything the
    launcher started (SuperLink, SuperExec, flwr-simulation, Ray's processes) inherits it."""
    marker = f"FLWR_HOME={Path(home)}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] != "Z":
            pids.add(int(entry.name))
    return pids


def load_run_config(path: str | os.PathLike) -> dict[str, object]:
    """A run-config TOML file (e.g. a preset) as the flat dict :func:`run_app` takes.

    Nested tables become dotted keys, as ``flwr run --run-config file.toml`` does.
    """
    with Path(path).expanduser().open("rb") as fh:
        return _flatten(tomllib.load(fh))


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
    return _flatten(flwr["app"].get("config", {}))


def _check_run_config_keys(
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


# ----------------------------------------------------------------------------------- the runner
class _LocalSuperLink:
    """A ``flower-superlink`` in simulation mode, owned by us (same flags as ``flwr run``'s own)."""

    def __init__(self, flwr_home: Path, env: dict[str, str], port: int, startup_timeout_s: float):
        runtime_dir = flwr_home / "local-superlink"
        runtime_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = runtime_dir / "superlink.log"
        command = [
            _executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(runtime_dir / "state.db"),
            "--log-file",
            str(self.log_path),
            "--disable-runtime-dependency-installation",
        ]
        self.proc = subprocess.Popen(  # noqa: S603
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not hit it before our cleanup
        )
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _healthy(port):
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"flower-superlink exited with code {self.proc.returncode} at start-up; "
                        f"its log:\n{self._log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"flower-superlink not healthy on port {port} after "
                        f"{startup_timeout_s:.0f} s; its log:\n{self._log_tail()}"
                    )
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def stop(self) -> None:
        _stop_process_tree(self.pid, self.proc)


def _run_flwr(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> str:
    """Run a short ``flwr`` command and return its stdout+stderr (never raises on exit code)."""
    try:
        done = subprocess.run(  # noqa: S603
            [_executable("flwr"), *args],
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


def _query_status(run_id: int, env: dict[str, str], cwd: Path) -> dict | None:
    # `flwr list` migrates a legacy pyproject.toml in its working directory: run it in FLWR_HOME.
    out = _run_flwr(["list", "--run-id", str(run_id), "--format", "json"], env, cwd, 60)
    try:
        return parse_flwr_list_json(out, run_id)
    except (ValueError, LookupError, RuntimeError):
        return None


def run_app(
    app_dir: str | os.PathLike = ".",
    *,
    num_supernodes: int,
    run_config: Mapping[str, object] | None = None,
    federation_config: Mapping[str, object] | None = None,
    flwr_home: str | os.PathLike | None = None,
    timeout_s: float = 3600,
    stream: bool = True,
    startup_timeout_s: float = 60,
) -> RunResult:
    """Run the Flower app in ``app_dir`` on ``num_supernodes`` simulated SuperNodes until it ends.

    Parameters
    ----------
    app_dir : the directory with the app's ``pyproject.toml`` (``[tool.flwr.app]``; it must not
        have a legacy ``[tool.flwr.federations]`` section).
    num_supernodes : the federation size (``--federation-config num-supernodes=N``).
    run_config : overrides of ``[tool.flwr.app.config]`` (bool/int/float/str values), e.g.
        ``{"num-clients": 3, "strategy": "fedavg"}``.
    federation_config : more simulation settings, e.g. ``{"client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.5}`` (fields of Flower's ``SimulationConfig``, with ``-``
        for ``_``).
    flwr_home : the Flower home for this run (config, SuperLink state/log in
        ``local-superlink/``, installed FABs in ``apps/``); kept afterwards. Default: a temporary
        directory, deleted afterwards.
    timeout_s : wall-clock limit of the run; on expiry the run is stopped and
        :class:`RunTimedOut` raised.
    stream : echo the run's log to stdout while it runs (it is kept in the result either way).

    Returns the :class:`RunResult` of a ``finished:completed`` run. Raises :class:`RunFailed` (with
    the status, Flower's status details and the log's tail) when the run ended otherwise
    (``finished:failed``/``finished:stopped``), when Flower refused to start it (status
    ``not-started``, e.g. an unknown run-config key) or the SuperLink did not come up, and
    :class:`RunTimedOut` (status ``timeout``) after ``timeout_s``. Bad arguments raise
    ``ValueError``/``TypeError``/``FileNotFoundError`` before anything is started. The SuperLink
    and everything it started are stopped before returning or raising.
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise ValueError(f"num_supernodes must be a positive int, got {num_supernodes!r}")
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be a positive int, got {num_supernodes!r}")
    app_path = Path(app_dir).expanduser().resolve()
    defaults = app_config(app_path)
    _check_run_config_keys(run_config or {}, defaults, app_path / "pyproject.toml")
    fed = {"num-supernodes": num_supernodes, **dict(federation_config or {})}
    run_args = format_config_args(run_config)
    fed_args = format_config_args(fed)

    t0 = time.monotonic()
    temp_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedke-flwr-home-")) if temp_home else Path(flwr_home)
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = _free_port(), _free_port()
    env = _flwr_env(home, http_port, control_port)

    lines: list[str] = []
    run_id: int | None = None
    superlink: _LocalSuperLink | None = None
    runner: subprocess.Popen | None = None
    finished = False

    def result(status: str, sub: str, details: str = "") -> RunResult:
        return RunResult(
            run_id=run_id,
            status=status,
            sub_status=sub,
            seconds=time.monotonic() - t0,
            log_text=strip_ansi("".join(lines)),
            details=details,
            flwr_home=None if temp_home else str(home),
        )

    try:
        try:
            superlink = _LocalSuperLink(home, env, http_port, startup_timeout_s)
        except RuntimeError as err:
            raise RunFailed(result("not-started", ""), reason=str(err)) from err
        command = [_executable("flwr"), "run", str(app_path)]
        for arg in fed_args:
            command += ["--federation-config", arg]
        for arg in run_args:
            command += ["--run-config", arg]
        command.append("--stream")
        runner = subprocess.Popen(  # noqa: S603
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )

        colour = stream and hasattr(sys.stdout, "isatty") and sys.stdout.isatty()

        def pump() -> None:
            assert runner is not None and runner.stdout is not None
            for line in runner.stdout:
                lines.append(line)
                if stream:
                    sys.stdout.write(line if colour else strip_ansi(line))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
        reader.start()
        deadline = t0 + timeout_s
        timed_out = False
        try:
            runner.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            runner.kill()
            runner.wait()
        reader.join(timeout=10)
        run_id = parse_run_id("".join(lines))

        if run_id is None:
            # Flower's reason for refusing a run is only in the SuperLink's log.
            refusals = [
                line.split("|", 3)[-1].strip()
                for line in superlink.log_lines()
                if "Could not start run" in line
            ]
            details = f"flwr run exited with code {runner.returncode}"
            if refusals:
                details += f"; SuperLink: {refusals[-1]}"
            raise RunFailed(
                result("not-started", "", details), reason="flwr run did not start a run"
            )
        if timed_out:
            _run_flwr(["stop", str(run_id)], env, home, 60)
            raise RunTimedOut(
                result("timeout", ""), reason=f"run {run_id} exceeded {timeout_s:.0f} s"
            )

        # The log stream ends when the run has finished; the status may lag for a moment.
        entry = None
        while True:
            entry = _query_status(run_id, env, home) or entry
            if entry is not None and split_status(entry.get("status", ""))[0] == STATUS_FINISHED:
                break
            if time.monotonic() > deadline:
                _run_flwr(["stop", str(run_id)], env, home, 60)
                raise RunTimedOut(
                    result(*split_status(entry.get("status", "unknown") if entry else "unknown")),
                    reason=f"run {run_id} exceeded {timeout_s:.0f} s",
                )
            time.sleep(1.0)
        status, sub_status = split_status(entry["status"])
        details = entry.get("status-details", "") or ""
        res = result(status, sub_status, "" if details == "N/A" else details)
        if not res.ok:
            raise RunFailed(res)
        finished = True
        return res
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.wait()
        if run_id is None:
            run_id = parse_run_id("".join(lines))
        if not finished and run_id is not None and superlink is not None and _alive(superlink.pid):
            try:  # e.g. Ctrl-C: end the run cleanly before the SuperLink goes
                _run_flwr(["stop", str(run_id)], env, home, 30)
            except BaseException:  # noqa: BLE001
                pass
        if superlink is not None:
            superlink.stop()
        for pid in _superlink_pids_on_port(http_port):  # a SuperLink `flwr run` might have started
            _stop_process_tree(pid)
        if temp_home:
            shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------------------------------ CLI
class OverrideError(ValueError):
    """A ``-c`` argument that is neither ``key=value`` pairs nor a readable TOML file."""


_OVERRIDE_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")  # flwr's parse_config_args pattern


def read_overrides(arguments: Iterable[str] | None) -> dict[str, object]:
    """``-c`` arguments -> one flat dict, later ones overriding earlier ones.

    Each argument is a ``.toml`` file (e.g. a preset; nested tables become dotted keys, as
    ``flwr run --run-config file.toml`` does) or ``key=value`` pairs in Flower's syntax
    (``"num-clients=3 strategy='fedavg'"``: TOML values), so ``-c presets/tiny.toml -c num-rounds=1``
    works. A bare word is taken as a string (``strategy=fedavg``). ``fedke run``, ``fedke compare``
    and ``python -m fedke.simulations.launch`` all read ``-c`` through here. Raises
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedke.simulations.launch",
        description="Run a Flower app with `flwr run` on a private local SuperLink, wait for it, "
        "check its final status and stop the SuperLink. Exit code 0 on success, 1 on failure.",
    )
    parser.add_argument("app_dir", nargs="?", default=".", help="app directory (default: .)")
    parser.add_argument("-n", "--num-supernodes", type=int, required=True)
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        metavar="'K=V [K=V ...]'",
        help="run-config overrides in flwr syntax (strings quoted: name='x') or a .toml file "
        "(a preset); repeatable, later ones win",
    )
    parser.add_argument(
        "--federation-config",
        action="append",
        metavar="'K=V'",
        help="extra simulation settings, e.g. client-resources-num-cpus=1 (repeatable)",
    )
    parser.add_argument("--flwr-home", default=None, help="Flower home to use and keep")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not echo the run's log")
    parser.add_argument(
        "--json", action="store_true", help="print the result (without the log) as JSON at the end"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 success, 1 failure, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        run_config = read_overrides(args.run_config)
        fed_config = read_overrides(args.federation_config)
        fed_config.pop("num-supernodes", None)
        result = run_app(
            args.app_dir,
            num_supernodes=args.num_supernodes,
            run_config=run_config,
            federation_config=fed_config,
            flwr_home=args.flwr_home,
            timeout_s=args.timeout,
            stream=not args.quiet,
        )
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped", file=sys.stderr)
        return 130
    except RunFailed as err:
        print(f"\nRUN FAILED: {err}", file=sys.stderr)
        if args.json:
            r = err.result
            print(json.dumps({"ok": False, "run_id": r.run_id, "status": r.status_text,
                              "details": r.details, "seconds": round(r.seconds, 2)}))
        return 1
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {"ok": True, "run_id": result.run_id, "status": result.status_text,
               "details": result.details, "seconds": round(result.seconds, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"\nrun {result.run_id}: {result.status_text} in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

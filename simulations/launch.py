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

Command line: ``fedke run [APP_DIR] [-n N] [-c key=value | -c preset.toml ...]``
(:mod:`fedke.simulations.cli`; exits 0 on success, 1 when the run failed or timed out, 130 on Ctrl-C).
The run-config values, Flower's output and the app's ``pyproject.toml`` are handled in
:mod:`fedke.simulations.flwr_cli`, the processes in :mod:`fedke.simulations.processes`.

Timings on a 2-core machine (flwr 1.41, Ray 2.55): SuperLink ready in about 3 s; a trivial app
with 2-3 supernodes and 1-2 rounds takes 14-16 s in ``flwr run`` (mostly Flower and Ray start-up,
also when the ServerApp fails at once); stopping the SuperLink takes about 1 s.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .flwr_cli import (STATUS_FINISHED, RunFailed, RunResult, RunTimedOut, app_config, check_run_config_keys,
                       flwr_env, format_config_args, parse_run_id, query_status, run_flwr, split_status, strip_ansi)
from .processes import executable, free_port, is_alive, is_healthy, stop_process_tree, superlink_pids_on_port

__all__ = ["LocalSuperLink", "run_app"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- the runner
class LocalSuperLink:
    """A ``flower-superlink`` in simulation mode, owned by us (same flags as ``flwr run``'s own)."""

    def __init__(self, flwr_home: Path, env: dict[str, str], port: int, startup_timeout_s: float):
        runtime_dir = flwr_home / "local-superlink"
        runtime_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = runtime_dir / "superlink.log"
        command = [
            executable("flower-superlink"),
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
            while not is_healthy(port):
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
        stop_process_tree(self.pid, self.proc)


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
    check_run_config_keys(run_config or {}, defaults, app_path / "pyproject.toml")
    fed = {"num-supernodes": num_supernodes, **dict(federation_config or {})}
    run_args = format_config_args(run_config)
    fed_args = format_config_args(fed)

    t0 = time.monotonic()
    temp_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedke-flwr-home-")) if temp_home else Path(flwr_home)
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    env = flwr_env(home, http_port, control_port)

    lines: list[str] = []
    run_id: int | None = None
    superlink: LocalSuperLink | None = None
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
            superlink = LocalSuperLink(home, env, http_port, startup_timeout_s)
        except RuntimeError as err:
            raise RunFailed(result("not-started", ""), reason=str(err)) from err
        command = [executable("flwr"), "run", str(app_path)]
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
            run_flwr(["stop", str(run_id)], env, home, 60)
            raise RunTimedOut(
                result("timeout", ""), reason=f"run {run_id} exceeded {timeout_s:.0f} s"
            )

        # The log stream ends when the run has finished; the status may lag for a moment.
        entry = None
        while True:
            entry = query_status(run_id, env, home) or entry
            if entry is not None and split_status(entry.get("status", ""))[0] == STATUS_FINISHED:
                break
            if time.monotonic() > deadline:
                run_flwr(["stop", str(run_id)], env, home, 60)
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
        if not finished and run_id is not None and superlink is not None and is_alive(superlink.pid):
            try:  # e.g. Ctrl-C: end the run cleanly before the SuperLink goes
                run_flwr(["stop", str(run_id)], env, home, 30)
            except BaseException:  # noqa: BLE001
                pass
        if superlink is not None:
            superlink.stop()
        for pid in superlink_pids_on_port(http_port):  # a SuperLink `flwr run` might have started
            stop_process_tree(pid)
        if temp_home:
            shutil.rmtree(home, ignore_errors=True)

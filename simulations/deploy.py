"""A real Flower deployment on loopback: one ``flower-superlink`` and N ``flower-supernode``s.

Unlike :func:`fedke.simulations.launch.run_app` (the simulation engine), this starts the
Deployment Engine's processes exactly as separate machines would, only on ``127.0.0.1``:

1. a Flower home (``FLWR_HOME``) for everything, with a ``config.toml`` naming one SuperLink
   connection ``loopback`` (``address = "127.0.0.1:<port>"``, ``insecure = true``);
2. ``flower-superlink --insecure --host 127.0.0.1 --port P --database <home>/state.db``
   (flwr 1.41 serves the Fleet, Control and ServerAppIo APIs on that one HTTP port);
3. N ``flower-supernode --insecure --superlink 127.0.0.1:P --host 127.0.0.1 --port Q_i
   --node-config "partition-id=i num-partitions=N"`` (each starts a fresh ClientApp process per
   message);
4. ``flwr run <app> loopback --run-config ... --stream``, then the run's real final status from
   ``flwr list --run-id <id> --format json`` (``flwr run`` exits 0 even when the run failed);
5. in a ``finally`` every process started here is stopped by its PID (its whole process tree,
   SIGTERM then SIGKILL), also on error, timeout and Ctrl-C; and should the owner be killed
   outright, the kernel sends them SIGTERM (``PR_SET_PDEATHSIG``, Linux).

All ports are free loopback ports picked at start; nothing listens on another interface.

    with LoopbackDeployment(num_supernodes=3) as deployment:
        result = deployment.run(".", run_config={"num-clients": 3}, timeout_s=300)
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from .flwr_cli import (RunFailed, RunResult, RunTimedOut, flwr_env, format_config_args, parse_run_id, query_status,
                       run_flwr, split_status, strip_ansi)
from .processes import executable, free_port, is_healthy, stop_process_tree

__all__ = ["LoopbackDeployment"]

log = logging.getLogger(__name__)

CONNECTION = "loopback"


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies.

    A ``finally`` cannot run when the owner is killed outright (SIGKILL, or SIGTERM without a
    handler, e.g. a test runner stopped by ``timeout``); the kernel's parent-death signal still
    stops the SuperLink and SuperNodes, which then stop their own children.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _flower_config(port: int) -> str:
    """``$FLWR_HOME/config.toml`` naming the loopback SuperLink as the default connection."""
    return tomli_w.dumps({"superlink": {"default": CONNECTION,
                                        CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}})


class LoopbackDeployment:
    """One SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1, stopped by PID on exit.

    Parameters
    ----------
    num_supernodes : int
        SuperNodes to start; node ``i`` gets ``--node-config "partition-id=i num-partitions=N"``.
    flwr_home : path or None
        The Flower home (config, SuperLink database and logs, installed apps). Default: a temporary
        directory, deleted on exit.
    startup_timeout_s : float
        How long to wait for the SuperLink to answer its health check.
    """

    def __init__(self, num_supernodes: int, *, flwr_home: str | Path | None = None,
                 startup_timeout_s: float = 60.0) -> None:
        if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
            raise ValueError(f"num_supernodes must be a positive int, got {num_supernodes!r}")
        self.num_supernodes = num_supernodes
        self._temp_home = flwr_home is None
        self.home = Path(tempfile.mkdtemp(prefix="fedke-deploy-") if flwr_home is None else flwr_home).resolve()
        self.startup_timeout_s = float(startup_timeout_s)
        self.port = 0
        self.env: dict[str, str] = {}
        #: (name, Popen) of every process started here, in start order.
        self.processes: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc in self.processes]

    def _spawn(self, name: str, command: list[str], log_path: Path) -> subprocess.Popen:
        handle = log_path.open("ab")
        try:
            proc = subprocess.Popen(  # noqa: S603
                command, env=self.env, cwd=self.home, stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            handle.close()
        self.processes.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def start(self) -> "LoopbackDeployment":
        """Start the SuperLink, wait until it is healthy, then start the SuperNodes."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = flwr_env(self.home, free_port(), free_port())
        (self.home / "config.toml").write_text(_flower_config(self.port))
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        try:
            superlink = self._spawn("superlink", [
                executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.home / "state.db"), "--disable-runtime-dependency-installation",
            ], logs / "superlink.log")
            deadline = time.monotonic() + self.startup_timeout_s
            while not is_healthy(self.port):
                if superlink.poll() is not None:
                    raise RuntimeError(f"flower-superlink exited with code {superlink.returncode}:\n"
                                       f"{self.log_tail('superlink')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink not healthy on 127.0.0.1:{self.port} after "
                                       f"{self.startup_timeout_s:.0f} s:\n{self.log_tail('superlink')}")
                time.sleep(0.2)
            for node in range(self.num_supernodes):
                self._spawn(f"supernode-{node}", [
                    executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", f"partition-id={node} num-partitions={self.num_supernodes}",
                ], logs / f"supernode-{node}.log")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process started here (SuperNodes first), each with its process tree, by PID."""
        for name, proc in reversed(self.processes):
            try:
                stop_process_tree(proc.pid, proc, grace_s=6.0)
            except Exception as error:  # noqa: BLE001 - keep stopping the others
                log.warning("stopping %s (pid %d) failed: %s", name, proc.pid, error)
        if self._temp_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "LoopbackDeployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.home / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ runs
    def run(self, app_dir: str | Path = ".", *, run_config: Mapping[str, object] | None = None,
            timeout_s: float = 600.0) -> RunResult:
        """``flwr run <app_dir> loopback --stream``; the :class:`RunResult` of a completed run.

        Raises :class:`RunFailed` when the run ends otherwise (the result holds status, details and
        log) and :class:`RunTimedOut` after ``timeout_s`` (the run is stopped with ``flwr stop``).
        """
        command = [executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION]
        for arg in format_config_args(run_config):
            command += ["--run-config", arg]
        command.append("--stream")
        t0 = time.monotonic()
        try:
            done = subprocess.run(command, env=self.env, cwd=self.home, stdin=subprocess.DEVNULL,  # noqa: S603
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", timeout=timeout_s, check=False)
            text, timed_out = strip_ansi(done.stdout), False
        except subprocess.TimeoutExpired as err:
            out = err.stdout or ""
            text, timed_out = strip_ansi(out.decode(errors="replace") if isinstance(out, bytes) else out), True
        run_id = parse_run_id(text)
        if timed_out:
            if run_id is not None:
                run_flwr(["stop", str(run_id), CONNECTION], self.env, self.home, 60)
            raise RunTimedOut(RunResult(run_id, "timeout", "", time.monotonic() - t0, text),
                              reason=f"run did not finish within {timeout_s:.0f} s")
        status = None
        if run_id is not None:
            for _ in range(50):  # the status may lag the end of the log stream by a moment
                status = query_status(run_id, self.env, self.home)
                if status is not None and str(status.get("status", "")).startswith("finished"):
                    break
                time.sleep(0.2)
        state, sub = split_status(str(status.get("status", ""))) if status else ("unknown", "")
        details = str(status.get("status-details", "")) if status else ""
        result = RunResult(run_id, state, sub, time.monotonic() - t0, text, details, str(self.home))
        if not result.ok:
            raise RunFailed(result)
        return result

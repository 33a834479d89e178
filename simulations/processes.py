"""The processes a run starts, seen through psutil: executables next to this Python, free loopback
ports, health checks, and stopping a whole process tree.

Public, because both engines use it: :mod:`fedke.simulations.launch` (a local SuperLink in
simulation mode) and :mod:`fedke.simulations.deploy` (a SuperLink and SuperNodes on loopback).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = [
    "descendants",
    "executable",
    "free_port",
    "is_alive",
    "is_healthy",
    "processes_with_flwr_home",
    "scripts_dir",
    "stop_process_tree",
    "superlink_pids_on_port",
]

log = logging.getLogger(__name__)


def scripts_dir() -> str:
    """The running Python's scripts directory (a venv's ``bin/``)."""
    return os.path.dirname(sys.executable)


def executable(name: str) -> str:
    """``name`` next to the running Python (the venv's bin/), else on PATH."""
    candidate = os.path.join(scripts_dir(), name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(port: int) -> bool:
    """True when a SuperLink answers ``GET /health`` on 127.0.0.1:``port`` with 2xx."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live process ``pid`` started, recursively (empty when ``pid`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not alive; one we may not inspect is)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def superlink_pids_on_port(port: int) -> list[int]:
    """PIDs of ``flower-superlink`` processes serving ``port`` (a safety net for ``flwr run``'s own)."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        args = process.info.get("cmdline") or []
        if any(a.endswith("flower-superlink") for a in args) and (
            f"--port={port}" in args or any(a == "--port" and b == str(port) for a, b in zip(args, args[1:]))
        ):
            pids.append(process.pid)
    return pids


def processes_with_flwr_home(home: str | os.PathLike) -> set[int]:
    """Live (non-zombie) processes whose environment has FLWR_HOME=<home>: everything the
    launcher started (SuperLink, SuperExec, flwr-simulation, Ray's processes) inherits it."""
    wanted = str(Path(home))
    pids = set()
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get("FLWR_HOME") == wanted and process.status() != psutil.STATUS_ZOMBIE:
                pids.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return pids


def stop_process_tree(
    pid: int, proc: subprocess.Popen | None = None, grace_s: float = 10.0
) -> None:
    """Stop ``pid`` and every process it started, escalating SIGTERM -> SIGTERM all -> SIGKILL.

    A SuperLink stops its ``flower-superexec`` on SIGTERM, but a ``flwr-simulation`` busy in a
    ClientApp (and its Ray processes) can outlive both, so the whole tree (as seen before and
    while stopping: orphans are re-parented to init) gets SIGTERM after ``grace_s / 2`` and
    SIGKILL after ``grace_s``.
    """
    tree = set(descendants(pid))
    t0 = time.monotonic()

    def alive_members() -> list[int]:
        if proc is not None:
            proc.poll()  # reap our own child so it does not linger as a zombie
        if is_alive(pid):
            tree.update(descendants(pid))
            return [pid, *(p for p in tree if is_alive(p))]
        return [p for p in tree if is_alive(p)]

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

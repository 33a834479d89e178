"""A real Flower deployment on loopback (slow, about a minute on 2 cores; runs in CI).

``flower-superlink`` and 3 ``flower-supernode``s are started on 127.0.0.1 only, with a temporary
Flower home (state database, logs, config); ``flwr run . loopback`` runs fedke's app with
CollabEdit for 2 rounds on the tiny preset; the run's real status is read back with ``flwr list``
and the merged result (the ServerApp's results table) is compared with the same scenario run in
process. Every process started is stopped by PID in a ``finally`` (the context manager), also when
the run fails; the test then checks that nothing carrying the Flower home survived.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from fedke.simulations.deploy import LoopbackDeployment
from fedke.simulations.flwr_cli import load_run_config
from fedke.simulations.processes import processes_with_flwr_home
from fedke.simulations.results import read_results

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "simulations" / "presets" / "tiny.toml"
METRICS = ("ES", "PS", "NS", "Score")

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def _kill_survivors(home: Path) -> set[int]:
    survivors = processes_with_flwr_home(home)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return survivors


def _metrics(table: pd.DataFrame, server_round: int, request_set: str = "all") -> dict[str, float]:
    rows = table[(table["round"] == server_round) & (table["request_set"] == request_set)]
    return dict(zip(rows["metric"], rows["value"].astype(float)))


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.mark.slow
@needs_proc
def test_loopback_deployment_runs_collabedit_for_two_rounds(tiny_bed, cache_dir, tmp_path, one_thread):
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    out = tmp_path / "results"
    config = {**load_run_config(TINY_PRESET), "cache-dir": str(cache_dir), "output-dir": str(out)}
    assert config.get("strategy", "collabedit") == "collabedit" and config["num-clients"] == 3 and config["num-rounds"] == 2
    home = (tmp_path / "flwr-home").resolve()
    deployment = LoopbackDeployment(3, flwr_home=home)
    try:
        with deployment:
            pids = list(deployment.pids)
            assert len(pids) == 4  # one SuperLink, three SuperNodes
            assert (home / "config.toml").read_text().count("127.0.0.1") == 1
            result = deployment.run(REPO, run_config=config, timeout_s=300)
            # the same app, new style: Flower's Message-API loop on the same SuperLink and SuperNodes
            message_out = tmp_path / "message-results"
            message_result = deployment.run(REPO, run_config={**config, "flower-api": "message",
                                                              "output-dir": str(message_out)}, timeout_s=300)
    finally:
        survivors = _kill_survivors(home)
    assert not survivors, f"processes {sorted(survivors)} survived the deployment"
    for pid in pids:  # our own children, reaped by the deployment: gone, not even zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    assert result.ok and result.status_text == "finished:completed", result.log_tail()
    table = read_results(out / "results.csv")
    summary = json.loads((out / "results.json").read_text())["summary"]["collabedit"]
    for server_round in (1, 2):
        merge = _metrics(table, server_round, "merge")
        assert merge["n_accepted"] == 3 and merge["n_rejected"] == 0 and merge["n_failures"] == 0
        assert merge["n_edits"] == 12
    assert summary["ES"] >= 80

    # The merged result equals the same scenario in a plain in-process loop (same requests per
    # partition id, float32 payloads, float64 sums: only summation order can differ).
    scenario = Scenario.from_run_config({**config, "output-dir": str(tmp_path / "inprocess")})
    reference = run_in_process(scenario, write=False).writer.table()
    for server_round in (1, 2):
        got, want = _metrics(table, server_round), _metrics(reference, server_round)
        for metric in METRICS:
            assert got[metric] == pytest.approx(want[metric], abs=1e-6), (server_round, metric)
        got, want = _metrics(table, server_round, "merge"), _metrics(reference, server_round, "merge")
        assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-6)

    # flower-api = "message": the same results through fedke.strategies.message and ArrayRecords
    assert message_result.ok and message_result.status_text == "finished:completed", message_result.log_tail()
    message_table = read_results(message_out / "results.csv")
    for server_round in (1, 2):
        got, want = _metrics(message_table, server_round), _metrics(reference, server_round)
        for metric in METRICS:
            assert got[metric] == pytest.approx(want[metric], abs=1e-6), ("message", server_round, metric)
        merge = _metrics(message_table, server_round, "merge")
        assert merge["n_accepted"] == 3 and merge["n_rejected"] == 0 and merge["n_edits"] == 12


@pytest.mark.slow
@needs_proc
def test_deployment_stops_everything_when_the_run_fails(tmp_path, one_thread):
    """A run that Flower refuses (unknown run-config key) raises RunFailed; nothing survives."""
    from fedke.simulations.flwr_cli import RunFailed

    home = (tmp_path / "flwr-home").resolve()
    try:
        with pytest.raises(RunFailed):
            with LoopbackDeployment(2, flwr_home=home) as deployment:
                deployment.run(REPO, run_config={"no-such-key": 1}, timeout_s=120)
    finally:
        survivors = _kill_survivors(home)
    assert not survivors, f"processes {sorted(survivors)} survived the failed deployment"


@needs_proc
def test_deployment_processes_die_with_their_owner(tmp_path):
    """The owner killed outright (SIGKILL: no finally runs): the SuperLink and SuperNodes still stop."""
    import subprocess
    import sys
    import time

    home = (tmp_path / "flwr-home").resolve()
    script = (
        "import sys, time\n"
        "from fedke.simulations.deploy import LoopbackDeployment\n"
        f"d = LoopbackDeployment(2, flwr_home={str(home)!r}).start()\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "started"
        assert len(processes_with_flwr_home(home)) >= 3
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while processes_with_flwr_home(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _kill_survivors(home)
    assert not survivors, f"processes {sorted(survivors)} outlived their owner"

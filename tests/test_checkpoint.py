"""Checkpoint and resume: a run killed with SIGKILL and resumed equals an uninterrupted run.

Also: the ServerApp path (Flower's round numbering shifted by the rounds done), refusals of a
mismatched or finished run, a damaged or half-written checkpoint, and RNG states.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedke.simulations.checkpoint import (
    CHECKPOINT_JSON,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    resume_point,
    run_fingerprint,
)
from fedke.simulations.scenario import Scenario

ROUNDS = 6


@pytest.fixture(scope="module")
def scenario(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-out")
    return Scenario.from_preset("tiny", num_rounds=ROUNDS, num_clients=3, edits_per_client=2, forgetting=True,
                                covariance="dynamic", cache_dir=str(cache_dir), output_dir=str(out))


@pytest.fixture(scope="module")
def uninterrupted(scenario, tiny_bed):
    from fedke.simulations.multiround import run_multiround

    return run_multiround(scenario, write=False)


def _quality(rows) -> pd.DataFrame:
    """The result rows that must match (everything but wall-clock timings), indexed for comparison."""
    frame = pd.DataFrame(rows)
    frame = frame[~frame.metric.str.contains("seconds")]
    return frame.set_index(["round", "method", "request_set", "metric"]).sort_index()["value"]


def _assert_same_run(rows, strategy_state, reference) -> None:
    got, want = _quality(rows), _quality(reference.writer.rows)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6, equal_nan=True)
    arrays = strategy_state["arrays"]
    for name, update in reference.strategy.global_update.items():
        np.testing.assert_allclose(arrays[f"global_update/{name}"], update, rtol=0, atol=1e-12)
        np.testing.assert_allclose(arrays[f"kkt_total/{name}"], reference.strategy.kkt_total[name], rtol=0, atol=1e-9)


DRIVER = textwrap.dedent("""
    import json, sys
    from fedke.simulations.scenario import Scenario
    from fedke.simulations.multiround import run_multiround

    scenario = Scenario(**json.loads(sys.argv[1]))
    def announce(server_round, metrics, seconds):
        print(f"round {server_round} done", flush=True)
    run_multiround(scenario, on_round=announce)
    print("finished", flush=True)
""")


def _driver(tmp_path: Path, scenario: Scenario, cache_dir) -> tuple[list[str], dict]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    from dataclasses import asdict

    env = {**os.environ, "FEDKE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [sys.executable, str(script), json.dumps(asdict(scenario))], env


def test_sigkill_then_resume_equals_an_uninterrupted_run(scenario, uninterrupted, cache_dir, tmp_path):
    kill_after = 2
    ckpt = tmp_path / "ckpt"
    run = replace(scenario, checkpoint_dir=str(ckpt), output_dir=str(tmp_path / "out"))
    command, env = _driver(tmp_path, run, cache_dir)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in child.stdout:
            if line.strip() == f"round {kill_after} done":
                child.send_signal(signal.SIGKILL)  # lands somewhere in round kill_after + 1
                break
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    crashed = load_checkpoint(ckpt)
    assert kill_after <= crashed.round < ROUNDS and not crashed.finished
    assert len(list(ckpt.glob("state-*.safetensors"))) == 1  # the previous round's arrays were removed
    assert not (tmp_path / "out" / "results.csv").exists()

    # resuming without resume = true is refused (a checkpoint is never overwritten)
    with pytest.raises(CheckpointError, match="set resume = true"):
        resume_point(run)

    resumed = subprocess.run(replace_command(command, replace(run, resume=True)), capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.splitlines()[-1] == "finished"
    done = [line for line in resumed.stdout.splitlines() if line.startswith("round ")]
    assert done[0] == f"round {crashed.round + 1} done" and done[-1] == f"round {ROUNDS} done"

    final = load_checkpoint(ckpt)
    assert final.round == ROUNDS and final.finished
    _assert_same_run(final.rows, final.strategy_state, uninterrupted)
    # the results files of the resumed run hold the whole run, the crashed rounds included
    table = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False)
    assert set(table["round"]) == set(range(1, ROUNDS + 1))
    _assert_same_run(table.to_dict("records"), final.strategy_state, uninterrupted)

    # a finished run is refused, and so is the same checkpoint under another config
    with pytest.raises(CheckpointError, match="already finished"):
        resume_point(replace(run, resume=True))
    with pytest.raises(CheckpointError, match=r"different config \(beta1: checkpoint 1.0, now 2.0"):
        resume_point(replace(run, resume=True, beta1=2.0))


def replace_command(command: list[str], scenario: Scenario) -> list[str]:
    from dataclasses import asdict

    return [*command[:2], json.dumps(asdict(scenario))]


def test_server_app_resumes_with_flower_round_numbers_shifted(scenario, uninterrupted, tmp_path):
    """Drive the ServerApp's strategy the way Flower's legacy server loop does, crash, resume."""
    from flwr.common import Context, RecordDict, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager

    from fedke.simulations.client_app import make_client
    from fedke.simulations.inprocess import LocalProxy, fit_result
    from fedke.simulations.server_app import server_fn

    run = replace(scenario, checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"))
    clients = {str(cid): make_client(run, cid) for cid in range(run.num_clients)}

    def serve(run_scenario: Scenario, crash_after: int | None = None):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_scenario.to_run_config())
        components = server_fn(context)
        strategy, num_rounds = components.strategy, components.config.num_rounds
        manager = SimpleClientManager()
        for cid in clients:
            manager.register(LocalProxy(cid))
        parameters = strategy.initialize_parameters(manager)
        strategy.evaluate(0, parameters)
        rounds_seen = []
        for flower_round in range(1, num_rounds + 1):
            instructions = strategy.configure_fit(flower_round, parameters, manager)
            results = []
            for proxy, fit_ins in instructions:
                rounds_seen.append(int(fit_ins.config["server_round"]))
                arrays = parameters_to_ndarrays(fit_ins.parameters)
                results.append((proxy, fit_result(*clients[proxy.cid].fit(arrays, fit_ins.config))))
            parameters, _ = strategy.aggregate_fit(flower_round, results, [])
            strategy.evaluate(flower_round, parameters)
            if crash_after is not None and flower_round == crash_after:
                break
        return num_rounds, sorted(set(rounds_seen))

    assert serve(run, crash_after=3) == (ROUNDS, [1, 2, 3])
    assert load_checkpoint(run.checkpoint_dir).round == 3
    with pytest.raises(CheckpointError, match="set resume = true"):
        serve(run)
    assert serve(replace(run, resume=True)) == (ROUNDS - 3, [4, 5, 6])
    final = load_checkpoint(run.checkpoint_dir)
    assert final.round == ROUNDS and final.finished
    oracle = [row for row in final.rows if row["request_set"] != "merge"]
    reference = [row for row in uninterrupted.writer.rows if row["request_set"] != "merge"]
    got, want = _quality(oracle), _quality(reference)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6, equal_nan=True)
    with pytest.raises(CheckpointError, match="already finished"):
        serve(replace(run, resume=True))


def test_a_half_written_round_leaves_the_last_complete_one(scenario, uninterrupted, tmp_path):
    from fedke.simulations.checkpoint import save_checkpoint

    directory = tmp_path / "ckpt"
    save_checkpoint(directory, scenario, uninterrupted.strategy, 4, uninterrupted.writer.rows[:10])
    # a crash after the next round's arrays were written but before checkpoint.json was
    (directory / "state-000005.safetensors").write_bytes(b"partial")
    (directory / f".{CHECKPOINT_JSON}.abc.tmp").write_text("{")
    loaded = load_checkpoint(directory)
    assert loaded.round == 4 and len(loaded.rows) == 10 and not loaded.finished
    assert loaded.fingerprint == run_fingerprint(scenario)
    # a damaged arrays file is named
    (directory / "state-000004.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(directory)
    (directory / CHECKPOINT_JSON).write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a fedke run checkpoint"):
        load_checkpoint(directory)
    assert load_checkpoint(tmp_path / "empty") is None


def test_fingerprint_ignores_where_things_go_and_nothing_else():
    base = Scenario()
    assert run_fingerprint(base) == run_fingerprint(replace(base, output_dir="x", cache_dir="y",
                                                            checkpoint_dir="z", resume=True))
    for change in ({"seed": 1}, {"beta1": 2.0}, {"num_rounds": 2}, {"covariance": "dynamic"}, {"lam": 1.0}):
        assert run_fingerprint(replace(base, **change)) != run_fingerprint(base), change


def test_rng_states_round_trip_through_json_and_arrays():
    import torch

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    arrays, meta = capture_rng()
    meta = json.loads(json.dumps(meta))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(arrays, meta)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.slow
def test_flwr_run_resumes_a_crashed_run(scenario, uninterrupted, tmp_path):
    """A real ``flwr run`` (private SuperLink, simulation engine) continues an in-process run that
    stopped after round 2, and ends where the uninterrupted run ends."""
    from fedke.simulations.launch import processes_with_flwr_home, run_app
    from fedke.simulations.multiround import run_multiround

    repo = Path(__file__).resolve().parents[1]
    run = replace(scenario, checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"))
    run_multiround(run, write=False, stop_after=2)
    assert load_checkpoint(run.checkpoint_dir).round == 2
    home = (tmp_path / "flwr-home").resolve()
    try:
        result = run_app(repo, num_supernodes=run.num_clients, run_config=replace(run, resume=True).to_run_config(),
                         flwr_home=home, timeout_s=400, stream=False)
    finally:
        survivors = processes_with_flwr_home(home)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"Flower processes {sorted(survivors)} survived the run"
    assert result.ok and result.status_text == "finished:completed", result.log_tail()
    final = load_checkpoint(run.checkpoint_dir)
    assert final.round == ROUNDS and final.finished
    oracle = [row for row in final.rows if row["request_set"] not in ("merge", "federated")]
    reference = [row for row in uninterrupted.writer.rows if row["request_set"] != "merge"]
    got, want = _quality(oracle), _quality(reference)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6, equal_nan=True)
    for name, update in uninterrupted.strategy.global_update.items():
        np.testing.assert_allclose(final.strategy_state["arrays"][f"global_update/{name}"], update, rtol=0, atol=1e-9)
    table = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False)
    assert set(table["round"]) == set(range(1, ROUNDS + 1))

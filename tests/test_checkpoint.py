"""Checkpoint and resume: a run killed with SIGKILL and resumed equals an uninterrupted run.

Also: the ServerApp path (Flower's round numbering shifted by the rounds done, one save per round
after the federated evaluation), refusals of a mismatched or finished run, a damaged or
half-written checkpoint, the append-only metrics log (a torn last line, bytes written per round
that do not grow with the round), and RNG states.
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
    METRICS_LOG,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    run_fingerprint,
    save_checkpoint,
)
from fedke.simulations.resume import resume_point
from fedke.simulations.scenario import Scenario
from fedke.simulations.results import read_results

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


@pytest.mark.slow
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
    # older rounds' arrays are removed after each commit (one may survive a kill between the two)
    assert 1 <= len(list(ckpt.glob("state-*.safetensors"))) <= 2
    assert not (tmp_path / "out" / "results.csv").exists()
    # a kill in the middle of appending the next round's line leaves a torn tail: ignored, then cut
    with open(ckpt / METRICS_LOG, "ab") as handle:
        handle.write(b'{"round":%d,"rows":{"round":[' % (crashed.round + 1))
    assert load_checkpoint(ckpt).rows == crashed.rows

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
    # the log holds one line per round, each round once, and the strategy's per-round merge metrics
    entries = [json.loads(line) for line in (ckpt / METRICS_LOG).read_text().splitlines()]
    assert [entry["round"] for entry in entries] == list(range(1, ROUNDS + 1))
    assert [m["server_round"] for m in final.strategy_state["meta"]["round_metrics"]] == list(range(1, ROUNDS + 1))
    assert len(list(ckpt.glob("state-*.safetensors"))) == 1
    # the results files of the resumed run hold the whole run, the crashed rounds included
    table = read_results(tmp_path / "out" / "results.csv")
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
    from flwr.common import Code, Context, EvaluateRes, RecordDict, Status, parameters_to_ndarrays
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
            evaluations = []  # the clients' federated evaluation, the round's last step
            for proxy, evaluate_ins in strategy.configure_evaluate(flower_round, parameters, manager):
                loss, count, metrics = clients[proxy.cid].evaluate(parameters_to_ndarrays(evaluate_ins.parameters),
                                                                   evaluate_ins.config)
                evaluations.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, count, metrics)))
            strategy.aggregate_evaluate(flower_round, evaluations, [])
            if crash_after is not None and flower_round == crash_after:
                break
        return num_rounds, sorted(set(rounds_seen))

    assert serve(run, crash_after=3) == (ROUNDS, [1, 2, 3])
    crashed = load_checkpoint(run.checkpoint_dir)
    assert crashed.round == 3
    with pytest.raises(CheckpointError, match="set resume = true"):
        serve(run)
    assert serve(replace(run, resume=True)) == (ROUNDS - 3, [4, 5, 6])
    final = load_checkpoint(run.checkpoint_dir)
    assert final.round == ROUNDS and final.finished
    oracle = [row for row in final.rows if row["request_set"] not in ("merge", "federated")]
    reference = [row for row in uninterrupted.writer.rows if row["request_set"] != "merge"]
    got, want = _quality(oracle), _quality(reference)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6, equal_nan=True)
    # the clients' federated metrics of every round are saved, those before the crash kept as they were
    federated = [row for row in final.rows if row["request_set"] == "federated"]
    assert {row["round"] for row in federated} == set(range(1, ROUNDS + 1))
    assert [row for row in federated if row["round"] <= 3] == [row for row in crashed.rows if row["request_set"] == "federated"]
    with pytest.raises(CheckpointError, match="already finished"):
        serve(replace(run, resume=True))


def test_a_half_written_round_leaves_the_last_complete_one(scenario, uninterrupted, tmp_path):
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, scenario, uninterrupted.strategy, 4, uninterrupted.writer.rows[:10])
    # a crash after the next round's arrays were written but before checkpoint.json was
    (directory / "state-000005.safetensors").write_bytes(b"partial")
    (directory / f".{CHECKPOINT_JSON}.abc.tmp").write_text("{")
    with open(directory / METRICS_LOG, "ab") as handle:  # and its metrics line was half appended
        handle.write(b'{"round":5,"rows":{"ro')
    loaded = load_checkpoint(directory)
    assert loaded.round == 4 and len(loaded.rows) == 10 and not loaded.finished
    assert loaded.rows == [dict(row) for row in uninterrupted.writer.rows[:10]]
    assert loaded.fingerprint == run_fingerprint(scenario)
    # a damaged arrays file is named
    (directory / "state-000004.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(directory)
    (directory / CHECKPOINT_JSON).write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a fedke run checkpoint"):
        load_checkpoint(directory)
    assert load_checkpoint(tmp_path / "empty") is None


# ----------------------------------------------------------------------------- the metrics log, cheaply


class FakeState:
    """A strategy stand-in for the checkpoint: a small array and a growing ``round_metrics``."""

    def __init__(self) -> None:
        self.update = np.zeros((4, 3))
        self.round_metrics: list[dict] = []

    def merge(self, server_round: int) -> None:
        self.update += server_round
        self.round_metrics.append({"server_round": server_round, "update_norm": float(np.linalg.norm(self.update))})

    def state_dict(self) -> dict:
        return {"arrays": {"global_update/w": self.update.copy()},
                "meta": {"rounds_merged": len(self.round_metrics), "round_metrics": [dict(m) for m in self.round_metrics]}}

    def load_state_dict(self, state) -> None:
        self.update = np.array(state["arrays"]["global_update/w"])
        self.round_metrics = [dict(m) for m in state["meta"]["round_metrics"]]


def _fake_rows(server_round: int, count: int = 35) -> list[dict]:
    return [{"round": server_round, "method": "collabedit", "request_set": f"new-{i % 7}", "metric": f"m{i}",
             "value": server_round + i / 8} for i in range(count)]


def test_bytes_written_per_round_do_not_grow_with_the_round(tmp_path, monkeypatch):
    """30 rounds: checkpoint.json and the state file keep their size, the log grows by one
    same-sized line a round, and only the last round's arrays file is kept."""
    import fedke.simulations.checkpoint as ckpt

    written: dict[str, list[int]] = {}
    real_write = ckpt.atomic_write_bytes

    def counting_write(path, data):
        written.setdefault(Path(path).name.split("-")[0], []).append(len(data))
        real_write(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", counting_write)
    rounds = 30
    scenario = replace(Scenario(model="world"), num_rounds=rounds, num_clients=2, edits_per_client=1)
    strategy, rows, appended = FakeState(), [], []
    for server_round in range(1, rounds + 1):
        strategy.merge(server_round)
        rows.extend(_fake_rows(server_round))
        before = (tmp_path / METRICS_LOG).stat().st_size if (tmp_path / METRICS_LOG).exists() else 0
        ckpt.save_checkpoint(tmp_path, scenario, strategy, server_round, rows)
        appended.append((tmp_path / METRICS_LOG).stat().st_size - before)
        assert [p.name for p in tmp_path.glob("state-*.safetensors")] == [f"state-{server_round:06d}.safetensors"]
    manifest_sizes, state_sizes = written[CHECKPOINT_JSON], written["state"]
    assert len(manifest_sizes) == len(state_sizes) == rounds  # one write of each per round
    # the whole metrics table at round 30 is ~30 x 2 kB; a few digits of round number are all that may change
    assert max(manifest_sizes) - min(manifest_sizes) < 64, manifest_sizes
    assert max(state_sizes) == min(state_sizes)
    # each line holds its round's 35 rows only (round 30's would be 30x round 1's if it held them all)
    assert max(appended) < 1.2 * min(appended) and sum(appended) == (tmp_path / METRICS_LOG).stat().st_size
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == rounds and loaded.finished
    assert loaded.rows == rows
    assert loaded.strategy_state["meta"]["round_metrics"] == strategy.round_metrics
    np.testing.assert_array_equal(loaded.strategy_state["arrays"]["global_update/w"], strategy.update)


def test_a_torn_or_uncommitted_log_tail_is_ignored_then_cut(tmp_path):
    scenario = replace(Scenario(model="world"), num_rounds=5)
    strategy, rows = FakeState(), []
    for server_round in (1, 2):
        strategy.merge(server_round)
        rows.extend(_fake_rows(server_round, 3))
        save_checkpoint(tmp_path, scenario, strategy, server_round, rows)
    log_path = tmp_path / METRICS_LOG
    committed = log_path.read_bytes()
    # round 3's whole line was appended but checkpoint.json never written, then round 4's line torn
    with open(log_path, "ab") as handle:
        handle.write(b'{"round":3,"rows":{"round":[],"method":[],"request_set":[],"metric":[],"value":[]},"round_metrics":[]}\n')
        handle.write(b'{"round":4,"rows":{"round":[4,')
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.rows == rows
    assert [m["server_round"] for m in loaded.strategy_state["meta"]["round_metrics"]] == [1, 2]
    # the resumed run's round 3 replaces the tail
    strategy.merge(3)
    rows.extend(_fake_rows(3, 3))
    save_checkpoint(tmp_path, scenario, strategy, 3, rows)
    assert log_path.read_bytes().startswith(committed)
    assert [json.loads(line)["round"] for line in log_path.read_text().splitlines()] == [1, 2, 3]
    assert load_checkpoint(tmp_path).rows == rows
    # a round is saved once; fewer rows than committed is refused
    with pytest.raises(CheckpointError, match="already holds round 3"):
        save_checkpoint(tmp_path, scenario, strategy, 3, rows)
    with pytest.raises(CheckpointError, match="pass every row"):
        save_checkpoint(tmp_path, scenario, strategy, 4, rows[:2])
    # a damaged committed prefix is named
    text = log_path.read_bytes()
    log_path.write_bytes(text.replace(b'"value":[1.0', b'"value":[9.0', 1))
    with pytest.raises(CheckpointError, match="SHA-256 chain"):
        load_checkpoint(tmp_path)
    log_path.write_bytes(text[: len(committed) - 5])
    with pytest.raises(CheckpointError, match="metrics log"):
        load_checkpoint(tmp_path)


def _fake_proxy(cid: str):
    """A Flower ClientProxy that answers fit and evaluate at once."""
    from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy

    class Proxy(ClientProxy):
        def get_properties(self, ins, timeout, group_id):
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):
            raise NotImplementedError

        def fit(self, ins, timeout, group_id):
            return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(2)]), 1, {})

        def evaluate(self, ins, timeout, group_id):
            return EvaluateRes(Status(Code.OK, ""), 0.5, 2, {"ES": 50.0 + int(ins.config["server_round"])})

        def reconnect(self, ins, timeout, group_id):
            raise NotImplementedError

    return Proxy(cid)


class FakeFlowerStrategy(FakeState):
    """The parts of a fedke strategy that Flower's loop calls; records rows as the real one does."""

    def __init__(self, writer, federated: bool) -> None:
        super().__init__()
        self.writer, self.federated = writer, federated

    def initialize_parameters(self, client_manager):
        from flwr.common import ndarrays_to_parameters

        return ndarrays_to_parameters([np.zeros(2)])

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns

        return [(proxy, FitIns(parameters, {"server_round": server_round})) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round, results, failures):
        self.merge(server_round)
        self.writer.record(server_round, {"n_results": len(results)}, request_set="merge")
        return results[0][1].parameters, {}

    def evaluate(self, server_round, parameters):
        if server_round > 0:
            self.writer.record(server_round, {"ES": float(server_round)}, request_set="old")
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        from flwr.common import EvaluateIns

        if not self.federated:
            return []
        return [(proxy, EvaluateIns(parameters, {"server_round": server_round})) for proxy in client_manager.all().values()]

    def aggregate_evaluate(self, server_round, results, failures):
        metrics = {"ES": float(np.mean([res.metrics["ES"] for _, res in results]))}
        self.writer.record(server_round, metrics, request_set="federated")
        return 0.5, metrics


@pytest.mark.parametrize("federated", [True, False])
def test_the_flower_loop_saves_once_per_round_after_its_last_step(tmp_path, monkeypatch, federated):
    """Flower's own ``Server.fit`` loop over the wrapper: one save per round, holding every row of
    the round (the clients' federated metrics included), rounds shifted after a resume."""
    from flwr.server import Server
    from flwr.server.client_manager import SimpleClientManager

    import fedke.simulations.checkpoint as ckpt
    import fedke.simulations.resume as resume
    from fedke.simulations.results import ResultsWriter

    saves = []
    real_save = ckpt.save_checkpoint

    def counting_save(directory, scenario, strategy, server_round, rows, **kwargs):
        saves.append((server_round, sorted({row["request_set"] for row in rows if row["round"] == server_round})))
        return real_save(directory, scenario, strategy, server_round, rows, **kwargs)

    monkeypatch.setattr(resume, "save_checkpoint", counting_save)
    scenario = replace(Scenario(model="world"), num_rounds=5, checkpoint_dir=str(tmp_path / "ckpt"))
    expected_sets = ["federated", "merge", "old"] if federated else ["merge", "old"]

    def serve(run: Scenario, rounds: int, done: int = 0):
        writer = ResultsWriter(tmp_path / "out", method="fake")
        inner = FakeFlowerStrategy(writer, federated)
        if done:
            resume.restore(resume.resume_point(run), inner, writer)
        manager = SimpleClientManager()
        for cid in ("0", "1"):
            manager.register(_fake_proxy(cid))
        server = Server(client_manager=manager, strategy=resume.ResumableStrategy(inner, run, writer, rounds_done=done))
        server.fit(num_rounds=rounds, timeout=None)
        return writer

    serve(scenario, 3)
    assert saves == [(r, expected_sets) for r in (1, 2, 3)]
    saves.clear()
    writer = serve(replace(scenario, resume=True), 2, done=3)
    assert saves == [(r, expected_sets) for r in (4, 5)]
    final = load_checkpoint(scenario.checkpoint_dir)
    assert final.round == 5 and final.finished and final.rows == writer.rows
    assert {(row["round"], row["request_set"]) for row in final.rows} == {(r, s) for r in range(1, 6) for s in expected_sets}
    if federated:  # the clients' metrics carry the true round after the resume
        assert [row["value"] for row in final.rows if row["request_set"] == "federated"] == [51.0, 52.0, 53.0, 54.0, 55.0]
    assert [m["server_round"] for m in final.strategy_state["meta"]["round_metrics"]] == [1, 2, 3, 4, 5]


def test_fingerprint_ignores_where_things_go_and_nothing_else():
    base = Scenario(model="world")
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
    from fedke.simulations.launch import run_app
    from fedke.simulations.processes import processes_with_flwr_home
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
    table = read_results(tmp_path / "out" / "results.csv")
    assert set(table["round"]) == set(range(1, ROUNDS + 1))


# ----------------------------------------------------------------------------- issue 21, item 6


def _saved(tmp_path, rounds: int = 2, **changes) -> Scenario:
    """A checkpoint of ``rounds`` rounds (FakeState) in ``tmp_path``; the scenario that resumes it."""
    scenario = replace(Scenario(model="world"), num_rounds=5, checkpoint_dir=str(tmp_path), **changes)
    strategy, rows = FakeState(), []
    for server_round in range(1, rounds + 1):
        strategy.merge(server_round)
        rows.extend(_fake_rows(server_round, 3))
        save_checkpoint(tmp_path, scenario, strategy, server_round, rows)
    return replace(scenario, resume=True)


def test_checkpoint_files_without_checkpoint_json_are_never_a_silent_restart(tmp_path):
    scenario = _saved(tmp_path)
    (tmp_path / CHECKPOINT_JSON).unlink()
    for run in (scenario, replace(scenario, resume=False)):  # resumed or not: it is not a fresh directory
        with pytest.raises(CheckpointError, match=r"no checkpoint\.json") as err:
            resume_point(run)
        assert "state-000002.safetensors" in str(err.value) and METRICS_LOG in str(err.value)
        assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError, match=r"no checkpoint\.json"):
        load_checkpoint(tmp_path)
    # the round's arrays alone (the metrics log deleted too) are still named
    (tmp_path / METRICS_LOG).unlink()
    with pytest.raises(CheckpointError, match=r"state-000002\.safetensors"):
        resume_point(scenario)
    # a directory without checkpoint files (other files of the run are fine) starts afresh
    (tmp_path / "state-000002.safetensors").unlink()
    (tmp_path / "results.csv").write_text("round\n")
    assert resume_point(scenario) is None
    assert resume_point(replace(scenario, checkpoint_dir=str(tmp_path / "new"))) is None


@pytest.mark.parametrize("damage", ["rng digit", "rounds_merged", "round", "arrays hash", "checksum", "no checksum"])
def test_checkpoint_json_carries_a_checksum_that_is_verified(tmp_path, damage):
    scenario = _saved(tmp_path)
    path = tmp_path / CHECKPOINT_JSON
    manifest = json.loads(path.read_text())
    assert manifest["version"] >= 3 and len(manifest["checksum_sha256"]) == 64
    if damage == "rng digit":
        manifest["rng"]["python"][1][7] ^= 1
    elif damage == "rounds_merged":
        manifest["strategy_meta"]["rounds_merged"] += 1
    elif damage == "round":
        manifest["round"] = 1
    elif damage == "arrays hash":
        manifest["arrays_sha256"] = manifest["arrays_sha256"][::-1]
    elif damage == "checksum":
        manifest["checksum_sha256"] = "0" * 64
    else:
        del manifest["checksum_sha256"]
    path.write_text(json.dumps(manifest, separators=(",", ":")))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json.*checksum") as err:
        resume_point(scenario)
    assert str(path) in str(err.value)


def test_a_digit_flipped_in_the_file_is_caught(tmp_path):
    """The fuzzer's case: one digit of checkpoint.json's text changed in place."""
    scenario = _saved(tmp_path)
    path = tmp_path / CHECKPOINT_JSON
    text = path.read_text()
    at = text.index('"python":[3,[') + len('"python":[3,[')
    digit = text[at]
    path.write_text(text[:at] + ("1" if digit != "1" else "2") + text[at + 1:])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path)
    path.write_text(text)
    assert resume_point(scenario).round == 2


def test_a_version_2_checkpoint_without_a_checksum_resumes_with_a_warning(tmp_path, caplog):
    """Checkpoints written before the checksum (version 2) are read, with a warning that
    checkpoint.json cannot be verified; the next save writes the current version."""
    secret = "an-old-secret-kept-in-clear-text"
    scenario = _saved(tmp_path, conflict_detection="hmac", conflict_secret=secret)
    path = tmp_path / CHECKPOINT_JSON
    manifest = json.loads(path.read_text())
    del manifest["checksum_sha256"]
    manifest["version"] = 2
    manifest["config"]["conflict_secret"] = secret  # version 2 stored the secret, and fingerprinted it
    import hashlib

    manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest["config"], sort_keys=True,
                                                        separators=(",", ":")).encode()).hexdigest()[:16]
    path.write_text(json.dumps(manifest, separators=(",", ":")))
    with caplog.at_level("WARNING"):
        checkpoint = resume_point(scenario)
    assert checkpoint.round == 2 and "no checksum" in caplog.text
    assert secret not in json.dumps(checkpoint.config) and secret not in caplog.text
    with pytest.raises(CheckpointError, match="different config") as err:  # another secret: refused, unnamed
        resume_point(replace(scenario, conflict_secret="yet-another-secret-0123456789"))
    assert secret not in str(err.value)
    strategy = FakeState()
    strategy.load_state_dict(checkpoint.strategy_state)
    strategy.merge(3)
    save_checkpoint(tmp_path, scenario, strategy, 3, checkpoint.rows + _fake_rows(3, 3))
    rewritten = path.read_text()
    assert secret not in rewritten and json.loads(rewritten)["version"] >= 3
    assert resume_point(scenario).round == 3

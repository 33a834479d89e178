"""The preserved-knowledge regulariser: A0 = lam C0 + alpha K0 K0^T (MemitConfig.knowledge_weight)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedke.editing.memit import MemitConfig, MemitEditor, _ridged
from fedke.simulations.scenario import Scenario
import fedke.testbed


def test_known_fact_requests_state_every_fact_in_its_trained_templates(tiny_bed):
    world = tiny_bed.world
    requests = world.known_fact_requests()
    assert len(requests) == len(world.training_examples())
    assert {(r.prompt.format(r.subject), r.target_new) for r in requests} == set(world.training_examples())
    assert all(r.target_new == r.target_true == world.facts[r.subject, r.relation_id] for r in requests)


def test_key_gram_sums_the_keys_outer_products_batch_by_batch(tiny_bed):
    editor = tiny_bed.editor()
    requests = tiny_bed.world.known_fact_requests()[:23]
    keys = editor.keys(requests)
    grams = editor.key_gram(requests, batch_size=5)
    for name, k in keys.items():
        np.testing.assert_allclose(grams[name], k @ k.T, rtol=1e-10, atol=1e-10)
    empty = editor.key_gram([])
    assert all(not gram.any() and gram.shape == grams[name].shape for name, gram in empty.items())


def test_regulariser_adds_alpha_times_the_knowledge_gram(tiny_bed):
    plain = tiny_bed.editor()
    grams = tiny_bed.knowledge_grams()
    protected = tiny_bed.editor(knowledge_weight=0.25)
    for name, a0 in plain.regularisers().items():
        expected = plain.config.lam * _ridged(plain.covariances[name], plain.config.cov_ridge) + 0.25 * grams[name]
        np.testing.assert_allclose(protected.regularisers()[name], expected, rtol=1e-12)
        assert np.linalg.norm(protected.regularisers()[name] - a0) > 0


def test_protected_edit_solves_with_the_larger_regulariser(tiny_bed):
    cases = tiny_bed.world.edit_cases(4, seed=3)
    requests = [c.request for c in cases]
    editor = tiny_bed.editor(knowledge_weight=0.5)
    payload, internals = editor.edit_with_internals(requests)
    regs = editor.regularisers()
    for name, layer in payload.layers.items():
        k, r = internals.keys[name], internals.residuals[name]
        # normal equations of the solve: Delta (A0 + K K^T) = R K^T with A0 including alpha K0 K0^T
        np.testing.assert_allclose(layer.delta @ (regs[name] + k @ k.T), r @ k.T, rtol=1e-6, atol=1e-8)
    weaker = tiny_bed.editor().edit(requests, targets=editor.compute_targets(requests))
    assert sum(np.linalg.norm(l.delta) for l in payload.layers.values()) < sum(
        np.linalg.norm(l.delta) for l in weaker.layers.values())


def test_knowledge_grams_are_cached_on_disk(tiny_bed):
    first = tiny_bed.knowledge_grams()
    fresh = replace(tiny_bed)
    again = fresh.knowledge_grams()
    assert set(again) == set(first)
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
    files = list(tiny_bed.cache_dir.glob("stats/*/knowledge-*/*.safetensors"))
    assert len(files) == len(first)


def test_bad_knowledge_settings(tiny_bed):
    with pytest.raises(ValueError, match="knowledge_weight"):
        MemitConfig(knowledge_weight=-1.0)
    with pytest.raises(ValueError, match="knowledge_weight"):
        MemitConfig(knowledge_weight=float("nan"))
    config = replace(tiny_bed.memit_config, knowledge_weight=1.0)
    with pytest.raises(ValueError, match="needs knowledge_grams"):
        MemitEditor(tiny_bed.model, tiny_bed.tokenizer, tiny_bed.covariances, config)
    grams = tiny_bed.knowledge_grams()
    name = next(iter(grams))
    with pytest.raises(ValueError, match="has shape"):
        MemitEditor(tiny_bed.model, tiny_bed.tokenizer, tiny_bed.covariances, config,
                    knowledge_grams={**grams, name: np.eye(3)})
    with pytest.raises(ValueError, match="no knowledge_grams"):
        MemitEditor(tiny_bed.model, tiny_bed.tokenizer, tiny_bed.covariances, config, knowledge_grams={})


def test_scenario_key():
    scenario = Scenario.from_run_config({"knowledge-weight": 0.01})
    assert scenario.knowledge_weight == 0.01
    assert scenario.memit_overrides()["knowledge_weight"] == 0.01
    with pytest.raises(ValueError, match="knowledge-weight"):
        Scenario(model="world", knowledge_weight=-0.5)


def test_the_server_merges_with_the_protected_regulariser(cache_dir, tiny_bed):
    from fedke.simulations.wiring import build_strategy

    scenario = Scenario.from_preset("tiny", knowledge_weight=0.2, cache_dir=str(cache_dir))
    strategy = build_strategy(scenario, evaluate=False, wait_for_clients=False)
    grams = tiny_bed.knowledge_grams()
    plain = tiny_bed.editor(lam=scenario.lam).regularisers()
    for name, a0 in strategy.regularisers.items():
        np.testing.assert_allclose(a0, plain[name] + 0.2 * grams[name], rtol=1e-12)


@pytest.mark.slow
def test_knowledge_sweep_benchmark(cache_dir, tiny_bed, tmp_path, load_bench):
    import json

    module = load_bench("forgetting_knowledge")
    out = tmp_path / "knowledge.json"
    result = module.main(["--quick", "--rounds", "3", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result) == {"config", "world_model", "key_space", "runs"}
    assert result["world_model"]["train_acc"] > 50 and result["world_model"]["epochs"] >= 1
    for row in result["key_space"].values():
        assert 1 <= row["rank_90"] <= row["rank_99"] <= row["d_in"]
        assert 0 <= row["directions_over_10x_a0"] <= row["directions_over_a0"] <= row["d_in"]
    assert [run["knowledge_weight"] for run in result["runs"]] == [0.0, 0.05]
    for run in result["runs"]:
        assert set(run) == {"knowledge_weight", "before", "after", "drop", "new_at_own_round", "seconds_per_round"}
        assert all(0 <= v <= 100 for stage in ("before", "after", "new_at_own_round") for v in run[stage].values())
        assert run["drop"] == {k: run["before"][k] - run["after"][k] for k in run["before"]}

"""Scenarios, the editing client and the in-process loop over the same clients and strategies."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedke.codec import decode_payload, decode_update, encode_update
from fedke.editing import applied_update
from fedke.simulations.dealing import deal_cases
from fedke.simulations.scenario import Scenario
from fedke.worldmodel import WorldModelConfig


@pytest.fixture(scope="module")
def tiny(tiny_bed, cache_dir, tmp_path_factory):
    """The tiny preset, on the session's cached tiny world model."""
    out = tmp_path_factory.mktemp("results")
    return Scenario.from_preset("tiny", cache_dir=str(cache_dir), output_dir=str(out))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_scenario_from_run_config_and_errors():
    scenario = Scenario.from_run_config({"strategy": "ties", "num-clients": 4, "ties-k": 0.3})
    assert scenario.num_clients == 4 and scenario.ties_k == 0.3
    assert scenario.strategy_kwargs() == {"density": 0.3, "scale": 1.0}
    with pytest.raises(ValueError, match="unknown run-config key 'num-client'"):
        Scenario.from_run_config({"num-client": 4})
    with pytest.raises(ValueError, match="strategy must be one of"):
        Scenario(model="world", strategy="median")
    with pytest.raises(ValueError, match="pairs"):
        Scenario(model="world", num_clients=50, edits_per_client=50, world_subjects=100, world_relations=2)
    with pytest.raises(ValueError, match="no preset"):
        Scenario.from_preset("no-such-preset")
    with pytest.raises(ValueError, match="model-epochs must be at least 1, got 0"):
        Scenario(model="world", model_epochs=0)
    # the world model's training budget is part of its config (and so of its cache key); the default
    # leaves WorldModelConfig, and every cached model, as it was
    assert Scenario(model="world").model_config() == WorldModelConfig(n_layer=4, n_embd=128, n_head=4)
    assert Scenario(model="world", model_width=256, model_epochs=80).model_config().max_epochs == 80
    # MEMIT's target optimisation: the defaults are the reference's (MemitConfig's), and the keys
    # reach the editor's config (a confident wide world model needs fedke.testbed.STRONG_TARGETS)
    from dataclasses import replace

    from fedke.editing.memit import MemitConfig
    from fedke.testbed import STRONG_TARGETS

    def target_settings(config):
        return config.v_num_grad_steps, config.clamp_norm_factor, config.loss_stop

    assert target_settings(replace(MemitConfig(), **Scenario().memit_overrides())) == target_settings(MemitConfig())
    strong = Scenario.from_run_config({"target-steps": 60, "target-clamp": 4.0, "target-loss-stop": 5e-4})
    assert target_settings(replace(MemitConfig(), **strong.memit_overrides())) == target_settings(
        replace(MemitConfig(), **STRONG_TARGETS))
    for key, value in (("target-steps", -1), ("target-clamp", -0.5), ("target-loss-stop", -1.0), ("lam", -3.0)):
        with pytest.raises(ValueError, match=f"{key} must be"):
            Scenario.from_run_config({key: value})
    # 0 / "auto" take the model's settings file: SmolLM2's for the default, the world's for model = world
    from fedke.editing.hparams import EditingSettings

    smollm2 = EditingSettings.load("smollm2").memit
    assert Scenario().memit_overrides()["lam"] == smollm2.lam and smollm2.fact_token == "subject_last"
    assert Scenario().memit_overrides()["fact_token"] == "subject_last"
    world = Scenario(model="world").memit_overrides()
    assert (world["lam"], world["fact_token"]) == (300.0, "last")
    assert Scenario(model="world", lam=30.0).memit_overrides()["lam"] == 30.0
    with pytest.raises(ValueError, match="fact-token must be"):
        Scenario(fact_token="first")
    with pytest.raises(ValueError, match="no editing settings 'nope.json'"):
        Scenario(hparams="nope.json")
    with pytest.raises(ValueError, match="dataset needs a real model"):
        Scenario(model="world", dataset="x.json")


def test_pyproject_defaults_are_the_scenario_defaults():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert Scenario.from_run_config(config) == Scenario()


def test_dealing_is_deterministic_and_never_repeats_a_fact(tiny, tiny_bed):
    dealt = deal_cases(tiny, tiny_bed.world)
    again = deal_cases(tiny, tiny_bed.world)
    assert {k: [c.case_id for c in v] for k, v in dealt.items()} == {k: [c.case_id for c in v] for k, v in again.items()}
    assert set(dealt) == {(c, r) for c in range(3) for r in (1, 2)}
    pairs = [(c.subject, c.relation_id) for cases in dealt.values() for c in cases]
    assert len(pairs) == len(set(pairs)) == tiny.total_edits
    by_relation = deal_cases(replace(tiny, partitioning="relation"), tiny_bed.world)
    mixed = lambda d: np.mean([len({c.relation_id for c in cs}) for cs in d.values()])  # noqa: E731
    assert mixed(by_relation) < mixed(dealt)
    global_edit = deal_cases(replace(tiny, strategy="global"), tiny_bed.world)
    assert set(global_edit) == {(0, 1), (0, 2)} and len(global_edit[0, 1]) == 12


def test_client_fit_and_evaluate(tiny, tiny_bed):
    from fedke.simulations.client_app import make_client

    client = make_client(tiny, 1)
    zeros = client.get_parameters({})
    arrays, n, metrics = client.fit(zeros, {"server_round": 1})
    payload = decode_payload(arrays, expected=client.layer_specs)
    assert n == payload.n_edits == 4 and metrics["payload_bytes"] > 0
    # the client restores the shared base model exactly
    before = {k: v.clone() for k, v in tiny_bed.model.state_dict().items()}
    update = {name: layer.delta for name, layer in payload.layers.items()}
    loss, count, scores = client.evaluate(encode_update(update), {"server_round": 1})
    assert count == 4 and 0.0 <= loss <= 1.0 and scores["ES"] >= 50
    assert all((before[k] == v).all() for k, v in tiny_bed.model.state_dict().items())
    # a round without requests sends an empty payload
    arrays, n, _ = client.fit(zeros, {"server_round": 9})
    assert n == 0 and decode_payload(arrays).n_edits == 0


# float64: round 1 is exact to ~1e-12; from round 2 on, clients add the update to float32 weights,
# where a 1e-12 difference can flip a weight's last bit, which the target optimisation amplifies
@pytest.mark.parametrize("wire_dtype, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_in_process_collabedit_equals_global_edit_round_by_round(tiny, tiny_bed, wire_dtype, tolerance):
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.runtime import dealt_cases_for

    tiny = replace(tiny, wire_dtype=wire_dtype)
    outcome = run_in_process(tiny)
    dealt = dealt_cases_for(tiny)
    editor = tiny_bed.editor(**tiny.memit_overrides())
    expected = {name: np.zeros_like(value) for name, value in outcome.strategy.global_update.items()}
    for server_round in (1, 2):
        requests = [c.request for (_, r), cs in sorted(dealt.items()) if r == server_round for c in cs]
        as_received = decode_update(encode_update(expected, dtype=wire_dtype))  # what clients get
        with applied_update(tiny_bed.model, as_received):
            payload = editor.edit(requests)
        expected = {name: expected[name] + payload.layers[name].delta for name in expected}
    for name, value in outcome.strategy.global_update.items():
        # exact up to the wire: float32 rounding of K K^T is amplified by cond(lam C + sum K K^T)
        assert _rel(value, expected[name]) < tolerance
    table = outcome.writer.table()
    assert set(table["round"]) == {1, 2}
    summary = outcome.summary
    assert summary.loc["collabedit", "ES"] >= 80
    assert (outcome.writer.output_dir / "results.csv").exists() and (outcome.writer.output_dir / "results.json").exists()


def test_compare_methods_is_table_1(tiny):
    from fedke.simulations.inprocess import compare_methods

    comparison = compare_methods(replace(tiny, num_rounds=1, wire_dtype="float64"))
    summary = comparison.summary
    assert set(summary.index) == {"Unedited", "GlobalEdit", "CollabEdit", "FedAvg", "TaskArithmetic", "TIES"}
    for name, value in comparison.updates["CollabEdit"].items():
        assert _rel(value, comparison.updates["GlobalEdit"][name]) < 1e-9
    assert abs(summary.loc["CollabEdit", "Score"] - summary.loc["GlobalEdit", "Score"]) <= 0.5
    assert summary.loc["Unedited", "ES"] <= 10
    assert summary.loc["FedAvg", "Score"] < summary.loc["GlobalEdit", "Score"]


def test_the_strategy_bounds_a_reply_by_the_scenarios_edits_per_client(tiny):
    """A client may count its share plus every conflicting twin, no more (FedAvg weighs by it)."""
    from fedke.simulations.wiring import build_strategy

    fedavg = replace(tiny, strategy="fedavg", conflict_pairs=1)
    strategy = build_strategy(fedavg, evaluate=False, wait_for_clients=False)
    assert strategy.max_edits_per_client == fedavg.edits_per_client + 1
    assert replace(tiny, strategy="global").max_edits_per_client == tiny.num_clients * tiny.edits_per_client
    assert replace(tiny, conflict_detection="hmac").max_edits_per_client is None  # winners re-edit, augmented

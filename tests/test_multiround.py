"""Multi-round forgetting scenarios: dealing, per-set metrics, dynamic covariance, baselines, flat state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedke.simulations.dealing import deal_cases
from fedke.simulations.scenario import Scenario

ROUNDS = 4


@pytest.fixture(scope="module")
def forgetting(cache_dir, tmp_path_factory):
    return Scenario.from_preset("tiny", num_rounds=ROUNDS, num_clients=3, edits_per_client=2, forgetting=True,
                                cache_dir=str(cache_dir), output_dir=str(tmp_path_factory.mktemp("mr-out")),
                                wire_dtype="float64")


# ---------------------------------------------------------------------- scenario keys and dealing
def test_forgetting_keys_are_validated():
    with pytest.raises(ValueError, match="needs strategy collabedit or global"):
        Scenario(model="world", strategy="fedavg", covariance="dynamic")
    with pytest.raises(ValueError, match="covariance must be"):
        Scenario(model="world", covariance="adaptive")
    with pytest.raises(ValueError, match="old-relations must be in 1..world-relations - 1"):
        Scenario(model="world", forgetting=True, old_relations=5)
    with pytest.raises(ValueError, match="beta0 must be greater than 0"):
        Scenario(model="world", covariance="dynamic", beta0=0.0)
    with pytest.raises(ValueError, match="resume = true needs checkpoint-dir"):
        Scenario(model="world", resume=True)
    with pytest.raises(ValueError, match="unrelated to the old set"):
        Scenario(model="world", forgetting=True, world_subjects=120, world_relations=3, num_clients=10, edits_per_client=2,
                 num_rounds=20)
    config = Scenario(model="world", forgetting=True, covariance="dynamic", beta0=2.0, beta1=3.0).to_run_config()
    scenario = Scenario.from_run_config(config)
    assert scenario.dynamic_covariance == (2.0, 3.0) and scenario.strategy_kwargs() == {"dynamic_covariance": (2.0, 3.0)}
    assert Scenario(model="world", strategy="global", covariance="dynamic").strategy_kwargs() == {"dynamic_covariance": (1.0, 1.0)}
    assert Scenario().dynamic_covariance is None


def test_forgetting_deal_old_then_unrelated_new_sets(forgetting, tiny_bed):
    dealt = deal_cases(forgetting, tiny_bed.world)
    assert deal_cases(forgetting, tiny_bed.world) == dealt
    by_round = {r: [c for (_, rr), cs in sorted(dealt.items()) if rr == r for c in cs] for r in range(1, ROUNDS + 1)}
    assert all(len(cases) == 6 for cases in by_round.values())
    assert all(len(dealt[client, r]) == 2 for client in range(3) for r in range(1, ROUNDS + 1))
    old = by_round[1]
    old_subjects = {c.request.subject for c in old}
    old_relations = {c.request.relation_id for c in old}
    assert len(old_relations) == forgetting.old_relations == 1
    new = [c for r in range(2, ROUNDS + 1) for c in by_round[r]]
    assert not {c.request.subject for c in new} & old_subjects
    assert not {c.request.relation_id for c in new} & old_relations
    pairs = [(c.request.subject, c.request.relation_id) for c in old + new]
    assert len(set(pairs)) == len(pairs)
    ids = [c.case_id for c in old + new]
    assert len(set(ids)) == len(ids)
    # Global-Edit holds the same requests, all in client 0
    global_dealt = deal_cases(replace(forgetting, strategy="global"), tiny_bed.world)
    assert [c.case_id for c in global_dealt[0, 1]] == [c.case_id for c in old]


def test_request_sets_per_round(forgetting, tiny_bed):
    from fedke.simulations.oracle import request_sets

    assert list(request_sets(forgetting, 1)) == ["old"]
    assert list(request_sets(forgetting, 2)) == ["old", "new-1"]
    assert list(request_sets(forgetting, ROUNDS)) == ["old", "new-1", "new-2", "new-3", "new-all"]
    final = request_sets(forgetting, ROUNDS)
    assert [c.case_id for c in final["new-all"]] == [c.case_id for n in ("new-1", "new-2", "new-3") for c in final[n]]
    plain = replace(forgetting, forgetting=False)
    assert list(request_sets(plain, 2)) == ["all"] and len(request_sets(plain, 2)["all"]) == 12


# ---------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def collab_runs(forgetting, tiny_bed):
    from fedke.simulations.multiround import run_multiround

    return {cov: run_multiround(replace(forgetting, covariance=cov), write=False) for cov in ("immutable", "dynamic")}


def test_rows_are_tidy_and_per_set_metrics_equal_a_direct_evaluation(forgetting, collab_runs):
    from fedke.simulations.oracle import round_cases
    from fedke.simulations.oracle import evaluate_update

    outcome = collab_runs["dynamic"]
    table = outcome.table()
    assert list(table.columns) == ["round", "method", "request_set", "metric", "value", "covariance"]
    assert set(table.method) == {"collabedit"} and set(table.covariance) == {"dynamic"}
    quality = table[table.request_set != "merge"]
    assert not quality.duplicated(["round", "request_set", "metric"]).any()
    sets = quality.groupby("round")["request_set"].unique().map(sorted).to_dict()
    assert sets == {1: ["old"], 2: ["new-1", "old"], 3: ["new-2", "old"],
                    4: ["new-1", "new-2", "new-3", "new-all", "old"]}
    assert set(table[table.request_set == "merge"]["round"]) == set(range(1, ROUNDS + 1))
    # the batched per-set aggregation equals evaluating each set on its own
    final = quality[quality["round"] == ROUNDS].pivot_table(index="request_set", columns="metric", values="value")
    for name, cases in (("old", round_cases(forgetting, 1)), ("new-2", round_cases(forgetting, 3))):
        direct = evaluate_update(forgetting, outcome.strategy.global_update, ROUNDS, cases)
        for metric in ("ES", "PS", "NS", "Score", "EA", "PA", "NA", "AccScore", "n_cases"):
            assert final.loc[name, metric] == pytest.approx(direct[metric], abs=1e-9), (name, metric)


def test_first_round_does_not_depend_on_the_covariance(collab_runs):
    tables = {cov: run.table() for cov, run in collab_runs.items()}
    first = {cov: t[(t["round"] == 1) & (t.request_set == "old")].set_index("metric")["value"] for cov, t in tables.items()}
    assert first["immutable"].equals(first["dynamic"])  # kkt_total is 0 before round 1: A_1 = A0


def test_dynamic_covariance_keeps_the_running_kkt_sum(forgetting, collab_runs, tiny_bed):
    """kkt_total is the sum of every round's clients' K K^T; the dynamic server solve uses it (eq. 7)."""
    from fedke.simulations.client_app import make_client
    from fedke.simulations.inprocess import fit_result
    from fedke.strategies.base import decode_reply

    dynamic, immutable = collab_runs["dynamic"].strategy, collab_runs["immutable"].strategy
    assert dynamic.rounds_merged == ROUNDS and dynamic.dynamic_covariance == (1.0, 1.0)
    assert immutable.dynamic_covariance is None
    for name, total in dynamic.kkt_total.items():
        assert np.all(np.isfinite(total)) and np.trace(total) > 0
    # the two runs diverge from round 2 on: the same old edits, different later merges
    assert any(not np.allclose(dynamic.global_update[n], immutable.global_update[n]) for n in dynamic.global_update)
    # round 1's K K^T sum: recompute it from the clients' round-1 payloads
    kkt = {name: np.zeros_like(total) for name, total in dynamic.kkt_total.items()}
    for cid in range(forgetting.num_clients):
        reply = fit_result(*make_client(forgetting, cid).fit([], {"server_round": 1}))
        payload = decode_reply(reply, expected=dynamic.layer_specs, max_norm=None, psd_tol=None)
        for name, layer in payload.layers.items():
            kkt[name] += layer.kkt
    state = dynamic.state_dict()
    assert state["meta"]["rounds_merged"] == ROUNDS
    for name in kkt:  # the total holds round 1's sum plus later rounds' PSD sums
        eigen = np.linalg.eigvalsh(dynamic.kkt_total[name] - kkt[name])
        assert eigen.min() > -1e-8 * max(1.0, eigen.max())


def test_collabedit_equals_global_edit_over_rounds_with_dynamic_covariance(forgetting, collab_runs):
    from fedke.simulations.multiround import run_multiround

    global_run = run_multiround(replace(forgetting, strategy="global", covariance="dynamic", num_rounds=ROUNDS),
                                write=False)
    collab = collab_runs["dynamic"].strategy
    for name, update in global_run.strategy.global_update.items():
        scale = float(np.abs(update).max())
        np.testing.assert_allclose(collab.global_update[name], update, rtol=0, atol=1e-9 * max(scale, 1.0))
        np.testing.assert_allclose(collab.kkt_total[name], global_run.strategy.kkt_total[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["fedavg", "task_arithmetic", "ties"])
def test_baselines_run_multi_round(forgetting, tiny_bed, method, tmp_path):
    import json

    from fedke.simulations.multiround import run_multiround

    outcome = run_multiround(replace(forgetting, strategy=method, num_rounds=3, output_dir=str(tmp_path)))
    table = outcome.table()
    old = table[(table.request_set == "old") & (table.metric == "Score")]
    assert list(old["round"]) == [1, 2, 3] and old.value.between(0, 100).all()
    assert outcome.strategy.rounds_merged == 3 and set(table.method) == {method}
    # results.json summarises the old edits after the last round
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary[method]["Score"] == pytest.approx(float(old.value.iloc[-1]))


def test_state_does_not_grow_with_payloads(collab_runs):
    """Long runs: per round only a fixed number of small rows; the strategy keeps no payloads."""
    outcome = collab_runs["immutable"]
    table = outcome.writer.table()
    per_round = table[table["round"].between(2, ROUNDS - 1)].groupby("round").size()
    assert per_round.nunique() == 1
    strategy = outcome.strategy
    arrays = [value for value in vars(strategy).values() if isinstance(value, np.ndarray)]
    assert not arrays  # arrays live only in the per-layer dicts below
    assert set(strategy.global_update) == set(strategy.kkt_total) == set(strategy.layer_names)
    assert len(strategy.round_metrics) == ROUNDS
    assert all(not isinstance(v, (np.ndarray, list, dict)) for entry in strategy.round_metrics for v in entry.values())
    assert outcome.seconds_per_round and len(outcome.seconds_per_round) == ROUNDS


def test_forgetting_benchmark_settings_reach_the_scenario(load_bench):
    """``--editor-mode sequential`` runs stock MEMIT, and CollabEdit then goes layer-wise (exact);
    ``--model-width`` / ``--model-epochs`` pick the world model and ``--target-*`` MEMIT's target
    optimisation, the preset's when not given."""
    module = load_bench("forgetting")
    default = module.scenario_from_args(module.parse_args(["--quick"]))
    sequential = module.scenario_from_args(module.parse_args(["--quick", "--editor-mode", "sequential"]))
    assert (default.editor_mode, default.layerwise_enabled) == ("decoupled", False)
    assert (sequential.editor_mode, sequential.layerwise_enabled) == ("sequential", True)
    assert sequential.forgetting and sequential.num_rounds == 6
    assert (default.model_width, default.model_epochs) == (64, 40)  # the tiny preset's
    wide = module.scenario_from_args(module.parse_args(["--model-width", "256", "--model-epochs", "80"]))
    assert (wide.model_width, wide.model_epochs, wide.world_subjects) == (256, 80, 1000)
    memit = wide.settings.memit  # left to the world's settings file: the reference's targets
    assert (memit.v_num_grad_steps, memit.clamp_norm_factor, memit.loss_stop) == (25, 0.75, 5e-2)
    strong = module.scenario_from_args(module.parse_args(
        ["--target-steps", "60", "--target-clamp", "4", "--target-loss-stop", "5e-4"]))
    assert (strong.target_steps, strong.target_clamp, strong.target_loss_stop) == (60, 4.0, 5e-4)
    with pytest.raises(SystemExit):
        module.parse_args(["--editor-mode", "stock"])
    real = module.scenario_from_args(module.parse_args(["--model", "smollm2", "--rounds", "5", "--edits-per-client", "20",
                                                        "--old-relations", "2", "--beta1", "10000"]))
    assert (real.model, real.is_world, real.num_rounds, real.edits_per_client) == ("smollm2", False, 5, 20)
    assert (real.forgetting, real.old_relations, real.beta1, real.settings.memit.fact_token) == (True, 2, 1e4, "subject_last")
    assert module.parse_args(["--runs", "dynamic"]).runs == ["dynamic"]
    with pytest.raises(SystemExit):  # the position split needs a round after the old edits'
        load_bench("forgetting_positions").main(["--quick", "--rounds", "1"])


@pytest.mark.slow
def test_forgetting_benchmark_writes_exactly_the_issue_keys(cache_dir, tiny_bed, tmp_path, capsys, load_bench):
    import json

    module = load_bench("forgetting")
    out = tmp_path / "forgetting.json"
    result = module.main(["--quick", "--rounds", "3", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert json.loads(out.read_text()).keys() == result.keys() == {
        "before", "after_immutable", "after_dynamic", "per_round", "seconds_per_round", "peak_rss_mb"}
    table5 = ["NS", "PS", "ES", "Score", "NA", "PA", "EA", "AccScore"]
    for key in ("before", "after_immutable", "after_dynamic"):
        assert list(result[key]) == table5 and all(0 <= v <= 100 for v in result[key].values())
    rounds = [(entry["covariance"], entry["round"]) for entry in result["per_round"]]
    assert rounds == [(c, r) for c in ("immutable", "dynamic") for r in (1, 2, 3)]
    assert result["before"] == {k: result["per_round"][0][f"old_{k}"] for k in table5}
    assert result["after_dynamic"] == {k: result["per_round"][-1][f"old_{k}"] for k in table5}
    assert "new_all_Score" in result["per_round"][-1] and "new_Score" not in result["per_round"][0]
    first, last = result["peak_rss_mb"]
    assert 0 < first <= last and result["seconds_per_round"] > 0
    assert "projected 1000-round run" in capsys.readouterr().out

    # one Global-Edit of the requests of rounds 1..t; at t = 1 it IS round 1 of the runs
    # (decoupled CollabEdit merges exactly to Global-Edit; targets are optimised per request)
    oneshot = load_bench("forgetting_oneshot").main(["--quick", "--rounds", "3", "--cache-dir", str(cache_dir),
                                                 "--compare", str(out), "--out", str(tmp_path / "oneshot.json")])
    assert [(run["rounds"], run["n_edits"]) for run in oneshot["runs"]] == [(1, 6), (3, 18)]
    round_one, round_three = oneshot["runs"]
    assert round_one["old"] == pytest.approx(result["before"], abs=1e-9) and round_one["new"] == {}
    assert list(round_three["old"]) == list(round_three["new"]) == table5
    assert oneshot["dynamic"] == {str(r): {k: result["per_round"][3 + r - 1][f"old_{k}"] for k in table5} for r in (1, 3)}

    # the later rounds' update split by token position: no mask is round 1, the full mask round 3
    positions = load_bench("forgetting_positions").main(["--quick", "--rounds", "3", "--cache-dir", str(cache_dir),
                                                         "--out", str(tmp_path / "positions.json")])
    assert list(positions["positions"]) == ["none", "all", "subject", "other"]
    assert {k: positions["positions"]["none"][k] for k in table5} == pytest.approx(result["before"], abs=1e-6)
    assert {k: positions["positions"]["all"][k] for k in table5} == pytest.approx(result["after_dynamic"], abs=1e-6)
    for summary in positions["positions"].values():
        assert summary["n_neighbours_edited_subject"] + summary["n_neighbours_unedited_subject"] > 0
    assert all(norms["U_R - U_1"] > 0 for norms in positions["update_norms"].values())


def test_forgetting_old_set_of_a_fact_set_has_neighbourhood_prompts():
    """On real facts a relation whose objects are unique (capitals) has no neighbourhood prompts,
    so NS / Score of an old set drawn from it would be undefined: E_o comes from relations and
    cases that have them."""
    from fedke.data.factset import FactSet
    from fedke.data.records import EditCase, EditRequest
    from fedke.simulations.dealing import forgetting_cases
    from fedke.simulations.scenario import Scenario

    cases = [EditCase(f"c{i}", EditRequest("{} is the capital of", f"City{i}", "Y", "P1376", f"Country{i}", case_id=f"c{i}"))
             for i in range(6)]
    cases += [EditCase(f"l{i}", EditRequest("{} speaks", f"Person{i}", "French", "P103", "English", case_id=f"l{i}"),
                       neighborhood_prompts=(f"Person{i + 1} speaks",) if i % 2 == 0 else (),
                       neighborhood_target="English")
              for i in range(12)]
    facts = FactSet.from_cases("mine", cases)
    scenario = Scenario(num_rounds=2, num_clients=2, edits_per_client=2, forgetting=True)
    for seed in range(5):
        chosen = forgetting_cases(replace(scenario, seed=seed), facts)
        old = chosen[:4]
        assert all(case.relation_id == "P103" and case.neighborhood_prompts for case in old)
        assert {case.relation_id for case in chosen[4:]} == {"P1376"}  # new requests: other relations

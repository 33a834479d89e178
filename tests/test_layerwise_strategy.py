"""Layer-wise CollabEdit as a Flower strategy (fedke.strategies.layerwise) and its clients.

Strategy tests build one-layer replies by hand and call the Flower methods directly; the model
tests run the real clients on the tiny world model (sequential MEMIT) and check the strategy path
against fedke.layerwise.layerwise_collab_edit and sequential Global-Edit.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from fedke.codec import decode_layer_step, encode_payload, encode_update
from fedke.merge import collab_edit_from_sums
from fedke.payload import EditPayload, LayerPayload
from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers, synthetic_specs
from fedke.strategies import CollabEdit, LayerwiseCollabEdit, make_strategy
from fedke.strategies.layerwise import edit_round_summary, layer_step_of

SPECS = synthetic_specs(d_in=6, d_out=4, layers=3)
NAMES = [spec.name for spec in SPECS]
L = len(SPECS)


def strategy(**kwargs) -> LayerwiseCollabEdit:
    kwargs.setdefault("regularisers", synthetic_regularisers(SPECS, 2.0))
    return LayerwiseCollabEdit(layer_specs=SPECS, min_fit_clients=0, min_available_clients=0,
                               min_evaluate_clients=0, fraction_evaluate=0.0, wire_dtype=np.float64, **kwargs)


def one_layer(step: int, seed: int, n_edits: int = 3) -> EditPayload:
    payload = synthetic_payload([SPECS[step]], n_edits, seed=seed)
    norms = np.full(n_edits, 0.5) if step == 0 else np.zeros(0)
    return EditPayload(layers=payload.layers, n_edits=n_edits, residual_norms=norms)


def reply(payload: EditPayload, code: Code = Code.OK) -> FitRes:
    arrays = encode_payload(payload, dtype=np.float64, send_delta=False)
    return FitRes(Status(code, ""), ndarrays_to_parameters(arrays), payload.n_edits, {})


def replies(step: int, seeds=(1, 2, 3)):
    return [(SimpleNamespace(cid=str(seed)), reply(one_layer(step, 10 * step + seed))) for seed in seeds]


def expected_delta(step: int, seeds=(1, 2, 3), regulariser=None):
    payloads = [one_layer(step, 10 * step + seed) for seed in seeds]
    name = NAMES[step]
    reg = synthetic_regularisers(SPECS, 2.0)[name] if regulariser is None else regulariser
    return collab_edit_from_sums(sum(p.layers[name].rkt for p in payloads), sum(p.layers[name].kkt for p in payloads), reg)


def run_steps(s: LayerwiseCollabEdit, server_rounds, seeds=(1, 2, 3)):
    out = []
    for server_round in server_rounds:
        out.append(s.aggregate_fit(server_round, replies(layer_step_of(server_round, L)[1], seeds), [])[1])
    return out


# ----------------------------------------------------------------------------- positions and the wire


def test_server_rounds_map_to_edit_rounds_and_layer_steps():
    assert [layer_step_of(s, 3) for s in range(1, 8)] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    s = strategy()
    assert s.steps_per_round == L and s.edit_round(0) == 0 and s.edit_round(4) == 2
    assert [s.ends_edit_round(r) for r in range(0, 7)] == [False, False, False, True, False, False, True]
    assert [spec.name for spec in s.reply_specs(5)] == [NAMES[1]]
    assert CollabEdit(layer_specs=SPECS, regularisers=synthetic_regularisers(SPECS)).steps_per_round == 1
    with pytest.raises(ValueError, match=">= 1"):
        layer_step_of(0, 3)
    assert isinstance(make_strategy("layerwise_collabedit", layer_specs=SPECS,
                                    regularisers=synthetic_regularisers(SPECS)), LayerwiseCollabEdit)


def test_fit_ins_carry_the_round_start_and_this_rounds_merged_layers():
    s = strategy(initial_update={spec.name: np.full((spec.d_out, spec.d_in), 0.25) for spec in SPECS})
    manager = SimpleClientManager()
    manager.register(SimpleNamespace(cid="7"))  # configure_fit only samples and reads the cid
    for server_round in (1, 2, 3, 4, 5):
        (proxy, ins), = s.configure_fit(server_round, None, manager)
        edit_round, step = layer_step_of(server_round, L)
        assert ins.config == {"server_round": edit_round, "layer_step": step, "layer_steps": L}
        start, merged = decode_layer_step(parameters_to_ndarrays(ins.parameters), expected=SPECS,
                                          merged_expected=SPECS[:step])
        assert list(merged) == NAMES[:step]
        for name in NAMES:
            assert np.array_equal(start[name], s.round_start[name])
        for name in merged:
            assert np.array_equal(merged[name], s.round_update[name])
            assert np.array_equal(start[name] + merged[name], s.global_update[name])
        if server_round == L + 1:  # edit round 2 starts from everything edit round 1 merged
            assert all(np.array_equal(s.round_start[name], s.global_update[name]) for name in NAMES)
            assert not any(s.round_update[name].any() for name in NAMES)
        s.aggregate_fit(server_round, replies(step), [])


# ----------------------------------------------------------------------------- aggregate_fit


def test_each_step_merges_its_layer_only_and_commits_its_kkt():
    s = strategy()
    before = {name: a.copy() for name, a in s.global_update.items()}
    for step in range(L):
        _, metrics = s.aggregate_fit(step + 1, replies(step), [])
        assert metrics["applied"] and metrics["n_accepted"] == 3
        assert (metrics["edit_round"], metrics["layer_step"], metrics["layer"]) == (1, step, NAMES[step])
        np.testing.assert_allclose(s.global_update[NAMES[step]], expected_delta(step), rtol=1e-12)
        for later in NAMES[step + 1:]:  # untouched, bit for bit
            assert np.array_equal(s.global_update[later], before[later])
            assert not s.kkt_total[later].any()
        kkt = sum(one_layer(step, 10 * step + seed).layers[NAMES[step]].kkt for seed in (1, 2, 3))
        np.testing.assert_allclose(s.kkt_total[NAMES[step]], kkt, rtol=1e-12)
    assert s.rounds_merged == L and s.steps_done == L


def test_bad_replies_and_failures_are_rejected_and_the_step_goes_on(caplog):
    s = strategy()
    all_layers = reply(synthetic_payload(SPECS, 3, seed=5))  # every layer: not what step 0 asks for
    wrong_layer = reply(one_layer(1, 6))
    bad = [(SimpleNamespace(cid="all"), all_layers), (SimpleNamespace(cid="wrong"), wrong_layer)]
    with caplog.at_level(logging.WARNING):
        _, metrics = s.aggregate_fit(1, replies(0) + bad, [RuntimeError("client crashed")])
    assert metrics["n_accepted"] == 3 and metrics["n_rejected"] == 2 and metrics["n_failures"] == 1
    assert {cid for cid, _ in s.last_rejections} == {"all", "wrong"}
    assert all("layer set differs" in reason for _, reason in s.last_rejections)
    assert "rejected the payload of client all" in caplog.text
    np.testing.assert_allclose(s.global_update[NAMES[0]], expected_delta(0), rtol=1e-12)
    # step 1 gets only bad replies (a NaN in R K^T, a non-OK status): layer 1 gets no update this
    # edit round, nothing changes, and step 2 goes on from the model as it is
    before = {name: a.copy() for name, a in s.global_update.items()}
    kkt_before = {name: a.copy() for name, a in s.kkt_total.items()}
    arrays = encode_payload(one_layer(1, 9), dtype=np.float64, send_delta=False)  # manifest, kkt, rkt, norms
    arrays[2] = arrays[2].copy()
    arrays[2][0, 0] = np.nan
    nan_reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 3, {})
    bad_status = reply(one_layer(1, 8), code=Code.FIT_NOT_IMPLEMENTED)
    _, metrics = s.aggregate_fit(2, [(SimpleNamespace(cid="nan"), nan_reply),
                                     (SimpleNamespace(cid="status"), bad_status)], [])
    assert not metrics["applied"] and metrics["n_accepted"] == 0 and metrics["update_norm"] == 0.0
    assert {cid for cid, _ in s.last_rejections} == {"nan", "status"}
    for name in NAMES:
        assert np.array_equal(s.global_update[name], before[name])
        assert np.array_equal(s.kkt_total[name], kkt_before[name])
    assert not s.round_update[NAMES[1]].any()
    _, metrics = s.aggregate_fit(3, replies(2), [])
    assert metrics["applied"]
    (_, ins), = s.configure_fit(4, None, _manager("0"))  # edit round 2 starts from it
    start, _ = decode_layer_step(parameters_to_ndarrays(ins.parameters), expected=SPECS, merged_expected=[])
    assert not start[NAMES[1]].any() and start[NAMES[2]].any()


def _manager(*cids):
    manager = SimpleClientManager()
    for cid in cids:
        manager.register(SimpleNamespace(cid=cid))
    return manager


def test_a_failing_merge_never_corrupts_the_update(monkeypatch):
    s = strategy()
    run_steps(s, [1])
    before = {name: a.copy() for name, a in s.global_update.items()}
    import fedke.strategies.collabedit as collabedit

    monkeypatch.setattr(collabedit, "collab_edit_from_sums", lambda *a: np.full((4, 6), np.inf))
    _, metrics = s.aggregate_fit(2, replies(1), [])
    assert not metrics["applied"] and "non-finite" in metrics["error"]
    for name in NAMES:
        assert np.array_equal(s.global_update[name], before[name])
    assert not s.kkt_total[NAMES[1]].any() and not s.round_update[NAMES[1]].any()


def test_dynamic_covariance_uses_the_kkt_of_earlier_edit_rounds_only():
    beta0, beta1 = 1.0, 0.5
    s = strategy(dynamic_covariance=(beta0, beta1))
    run_steps(s, range(1, L + 1))
    totals = {name: a.copy() for name, a in s.kkt_total.items()}
    round_two = {name: a.copy() for name, a in s.global_update.items()}
    run_steps(s, range(L + 1, 2 * L + 1), seeds=(4, 5))
    a0 = synthetic_regularisers(SPECS, 2.0)
    for step, name in enumerate(NAMES):
        delta = expected_delta(step, seeds=(4, 5), regulariser=beta0 * a0[name] + beta1 * totals[name])
        np.testing.assert_allclose(s.global_update[name] - round_two[name], delta, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- evaluation and metrics


def test_evaluation_and_round_end_only_after_an_edit_rounds_last_step():
    oracle, ends = [], []
    s = strategy(evaluate_fn=lambda r, update: oracle.append(r) or (0.0, {}),
                 on_round_end=lambda r, metrics: ends.append((r, metrics)))
    s.fraction_evaluate = 1.0
    s.min_evaluate_clients = 1
    manager = _manager("0")
    evaluations = []
    s.evaluate(0, None)
    for server_round in range(1, 2 * L + 1):
        s.aggregate_fit(server_round, replies(layer_step_of(server_round, L)[1]), [])
        s.evaluate(server_round, None)
        evaluations += [ins.config["server_round"] for _, ins in s.configure_evaluate(server_round, None, manager)]
    assert oracle == [0, 1, 2] and evaluations == [1, 2]
    assert [r for r, _ in ends] == [1, 2]
    summary = ends[0][1]
    assert summary["layer_steps"] == L and summary["layers_applied"] == L and summary["applied"]
    assert summary["n_results"] == 3 * L and summary["n_edits"] == 9
    assert summary["residual_norm_count"] == 9  # step 0's
    steps = [m for m in s.round_metrics if m["edit_round"] == 1]
    assert summary["update_norm"] == pytest.approx(np.sqrt(sum(m["update_norm"] ** 2 for m in steps)))
    assert [m["server_round"] for m in s.round_metrics] == list(range(1, 2 * L + 1))


def test_edit_round_summary_of_a_missing_or_failed_step():
    steps = [{"layer_step": 0, "n_results": 2, "n_accepted": 2, "n_edits": 6, "applied": True, "update_norm": 3.0,
              "residual_norm_mean": 1.0},
             {"layer_step": 1, "n_results": 2, "n_accepted": 0, "n_edits": 0, "applied": False, "update_norm": 0.0,
              "error": "boom"}]
    summary = edit_round_summary(steps, 3)
    assert summary["n_edits"] == 0 and summary["layers_applied"] == 1 and not summary["applied"]
    assert summary["update_norm"] == 3.0 and summary["residual_norm_mean"] == 1.0
    assert summary["error"] == "layer step 1: boom"


# ----------------------------------------------------------------------------- state and refusals


def test_state_round_trip_mid_edit_round_continues_bit_for_bit():
    reference = strategy(dynamic_covariance=(1.0, 0.5))
    run_steps(reference, range(1, L + 2))  # edit round 1, then step 0 of edit round 2
    restored = strategy(dynamic_covariance=(1.0, 0.5))
    restored.load_state_dict(reference.state_dict())
    assert (restored.current_edit_round, restored.steps_done) == (2, 1)
    assert reference.fit_parameters(L + 2).tensors == restored.fit_parameters(L + 2).tensors
    for s in (reference, restored):
        run_steps(s, range(L + 2, 2 * L + 1), seeds=(4, 5))
    for group in ("global_update", "kkt_total", "round_start", "round_update"):
        for name in NAMES:
            assert np.array_equal(getattr(restored, group)[name], getattr(reference, group)[name]), (group, name)
    state = reference.state_dict()
    state["arrays"][f"round_update/{NAMES[0]}"] = state["arrays"][f"round_update/{NAMES[0]}"] + 1.0
    with pytest.raises(ValueError, match="round_start \\+ round_update"):
        strategy().load_state_dict(state)
    del state["meta"]["layerwise"]
    with pytest.raises(ValueError, match="layerwise"):
        strategy().load_state_dict(state)
    with pytest.raises(ValueError, match="cannot load"):
        CollabEdit(layer_specs=SPECS, regularisers=synthetic_regularisers(SPECS)).load_state_dict(reference.state_dict())


def test_what_does_not_combine_is_refused():
    with pytest.raises(ValueError, match="conflict detection"):
        strategy(conflict_coordinator=object())
    with pytest.raises(ValueError, match="use_sums"):
        strategy(use_sums=False)
    s = strategy()
    with pytest.raises(TypeError, match="one layer per server round"):
        s.merge([one_layer(0, 1)])
    run_steps(s, [1, 2])
    with pytest.raises(RuntimeError, match="already aggregated"):
        s.aggregate_fit(1, replies(0), [])
    run_steps(s, [3, 4])
    with pytest.raises(RuntimeError, match="out of order"):
        s.configure_fit(2, None, _manager("0"))

"""Layer-wise CollabEdit end to end on the tiny world model (sequential MEMIT, 2 edited layers).

The Flower-strategy path (LayerwiseCollabEdit + EditClient, in process, and the real ServerApp /
ClientApp over an in-memory grid, legacy and streaming fit stages) equals the in-process driver
fedke.layerwise.layerwise_collab_edit and sequential Global-Edit; clients keep their targets in
Context.state between steps and a fresh client recomputes them bit for bit; evaluation and results
are per edit round; checkpoints resume at edit-round boundaries.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from flwr.common import Code, Context, EvaluateRes, RecordDict, Status, parameters_to_ndarrays

from fedke.codec import decode_payload, decode_update, encode_update
from fedke.editing import applied_update
from fedke.layerwise import layerwise_collab_edit
from fedke.simulations.scenario import Scenario


@pytest.fixture(scope="module")
def sequential(tiny_bed, cache_dir, tmp_path_factory):
    """The tiny preset with stock MEMIT: layerwise = "auto" makes CollabEdit layer-wise."""
    out = tmp_path_factory.mktemp("lw-results")
    return Scenario.from_preset("tiny", editor_mode="sequential", wire_dtype="float64", cache_dir=str(cache_dir),
                                output_dir=str(out))


def _rel(update, reference) -> float:
    num = sum(float(np.linalg.norm(update[k] - reference[k]) ** 2) for k in reference)
    return float(np.sqrt(num / sum(float(np.linalg.norm(reference[k]) ** 2) for k in reference)))


def _requests(scenario, edit_round):
    from fedke.simulations.runtime import dealt_cases_for

    dealt = dealt_cases_for(scenario)
    return [[case.request for case in dealt[cid, edit_round]] for cid in range(scenario.num_clients)]


@pytest.fixture(scope="module")
def in_process(sequential):
    from fedke.simulations.inprocess import run_in_process

    return run_in_process(sequential, write=False)


# ----------------------------------------------------------------------------- scenario


def test_layerwise_key_auto_true_false(sequential):
    assert sequential.layerwise == "auto" and sequential.layerwise_enabled
    assert not replace(sequential, editor_mode="decoupled").layerwise_enabled
    assert not replace(sequential, layerwise="false").layerwise_enabled
    for auto_off in ({"strategy": "ties"}, {"residual_guard": 0.5}, {"secure_aggregation": True},
                     {"conflict_detection": "hmac", "conflict_secret": "x" * 16}):
        assert not replace(sequential, **auto_off).layerwise_enabled, auto_off
        with pytest.raises(ValueError, match="layerwise = 'true' does not combine"):
            replace(sequential, layerwise="true", **auto_off)
    with pytest.raises(ValueError, match="editor-mode = 'decoupled'"):
        replace(sequential, layerwise="true", editor_mode="decoupled")
    with pytest.raises(ValueError, match="layerwise must be"):
        replace(sequential, layerwise="maybe")
    assert Scenario.from_run_config({"layerwise": True, "editor-mode": "sequential"}).layerwise == "true"
    assert replace(sequential, strategy="global").layerwise_enabled


def test_the_run_fingerprint_holds_whether_the_run_is_layerwise(sequential):
    from fedke.simulations.checkpoint import fingerprint_config, run_fingerprint

    decoupled = replace(sequential, editor_mode="decoupled")
    assert run_fingerprint(decoupled) == run_fingerprint(replace(decoupled, layerwise="false"))
    assert "layerwise" not in fingerprint_config(decoupled)
    assert run_fingerprint(sequential) == run_fingerprint(replace(sequential, layerwise="true"))
    assert run_fingerprint(sequential) != run_fingerprint(replace(sequential, layerwise="false"))
    assert fingerprint_config(sequential)["layerwise"] is True


def test_server_app_runs_num_rounds_times_the_layers(sequential):
    from fedke.simulations.server_app import server_fn
    from fedke.strategies import CollabEdit, LayerwiseCollabEdit

    def components(scenario):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=scenario.to_run_config())
        return server_fn(context)

    layered = components(sequential)
    assert isinstance(layered.strategy, LayerwiseCollabEdit) and layered.strategy.steps_per_round == 2
    assert layered.config.num_rounds == sequential.num_rounds * 2
    one_shot = components(replace(sequential, layerwise="false"))
    assert type(one_shot.strategy) is CollabEdit and one_shot.config.num_rounds == sequential.num_rounds


# ----------------------------------------------------------------------------- the client


def test_client_keeps_its_targets_in_state_and_a_fresh_client_recomputes_them_bit_for_bit(sequential):
    from fedke.simulations.client import TARGETS_META, TARGETS_RECORD
    from fedke.simulations.client_app import make_client
    from fedke.strategies import LayerwiseCollabEdit
    from fedke.simulations.wiring import build_strategy

    strategy = build_strategy(sequential, evaluate=False, wait_for_clients=False)
    assert isinstance(strategy, LayerwiseCollabEdit)
    state = RecordDict()
    client = make_client(sequential, 1, state=state)
    step0 = client.fit(parameters_to_ndarrays(strategy.fit_parameters(1)), strategy.fit_config(1, "1"))
    assert step0[2]["targets_reused"] == 0 and TARGETS_RECORD in state and TARGETS_META in state
    payload = decode_payload(step0[0])
    assert list(payload.layers) == [strategy.layer_names[0]] and payload.layers[strategy.layer_names[0]].delta is None
    assert payload.n_edits == 4 and payload.residual_norms.shape == (4,)
    from fedke.simulations.inprocess import LocalProxy, fit_result

    strategy.aggregate_fit(1, [(LocalProxy("1"), fit_result(*step0))], [])
    parameters, config = parameters_to_ndarrays(strategy.fit_parameters(2)), strategy.fit_config(2, "1")
    assert config == {"server_round": 1, "layer_step": 1, "layer_steps": 2}
    # a new client object over the same state (a new ClientApp call, same Context.state): reused
    reused = make_client(sequential, 1, state=state).fit(parameters, config)
    # a fresh process (empty state): recomputed on the round-start model, the same bits
    fresh_state = RecordDict()
    fresh = make_client(sequential, 1, state=fresh_state).fit(parameters, config)
    assert reused[2]["targets_reused"] == 1 and fresh[2]["targets_reused"] == 0
    assert len(reused[0]) == len(fresh[0]) == 4  # manifest, K K^T, R K^T, residual norms (none at step 1)
    for a, b in zip(reused[0], fresh[0]):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    for name in ("z", "h_init"):
        assert state[TARGETS_RECORD][name].numpy().tobytes() == fresh_state[TARGETS_RECORD][name].numpy().tobytes()
    assert decode_payload(reused[0]).residual_norms.size == 0
    # another edit round's requests or round start: not reused
    other = make_client(sequential, 1, state=state)
    targets, was_reused = other.round_targets(2, [c.request for c in other.cases_by_round[2]],
                                              decode_update(encode_update(strategy.global_update, dtype=np.float64)))
    assert not was_reused


def test_the_client_refuses_what_does_not_combine(sequential):
    from fedke.simulations.client_app import make_client
    from fedke.simulations.wiring import build_strategy

    strategy = build_strategy(sequential, evaluate=False, wait_for_clients=False)
    parameters, config = parameters_to_ndarrays(strategy.fit_parameters(1)), strategy.fit_config(1, "0")
    client = make_client(sequential, 0)
    client.residual_guard = 0.5
    with pytest.raises(ValueError, match="residual guard"):
        client.fit(parameters, config)
    with pytest.raises(ValueError, match="layer step 5 of 2"):
        make_client(sequential, 0).fit(parameters, {**config, "layer_step": 5})
    # a client without requests this round sends an empty one-layer payload
    arrays, n, _ = make_client(sequential, 0).fit(parameters, {**config, "server_round": 9})
    assert n == 0 and list(decode_payload(arrays).layers) == [strategy.layer_names[0]]


# ----------------------------------------------------------------------------- exactness


def test_the_flower_strategy_path_equals_the_driver_and_sequential_global_edit(sequential, in_process, tiny_bed):
    """Round by round (float64 wire): the strategy's merged update is the in-process driver's and,
    up to float32 weight rounding, sequential Global-Edit's (one-shot CollabEdit is not)."""
    from fedke.simulations.client_app import make_client
    from fedke.simulations.inprocess import LocalProxy, run_edit_round
    from fedke.simulations.wiring import build_strategy

    editor = tiny_bed.editor(**sequential.memit_overrides())
    strategy = build_strategy(sequential, evaluate=False, wait_for_clients=False)
    clients = [make_client(sequential, cid) for cid in range(sequential.num_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    previous = {}
    for edit_round in (1, 2):
        requests = _requests(sequential, edit_round)
        run_edit_round(strategy, clients, proxies, edit_round)
        merged = {name: strategy.global_update[name] - previous.get(name, 0.0) for name in strategy.global_update}
        driver = layerwise_collab_edit(editor, requests, base_update=previous or None)
        assert _rel(merged, driver) < 1e-9, edit_round
        with applied_update(tiny_bed.model, previous):
            global_edit = editor.edit([r for rs in requests for r in rs]).deltas()
        assert _rel(merged, global_edit) < 1e-6, edit_round
        previous = {name: update.copy() for name, update in strategy.global_update.items()}
    # run_in_process drives the same sub-rounds
    for name, update in in_process.strategy.global_update.items():
        assert np.array_equal(update, strategy.global_update[name]), name
    # the results are keyed by edit round: one merge summary and one oracle row set per edit round
    table = in_process.writer.table()
    assert sorted(set(table["round"])) == [1, 2]
    merge = table[table.request_set == "merge"].set_index(["round", "metric"])["value"]
    assert merge[(1, "layer_steps")] == 2 and merge[(1, "layers_applied")] == 2 and merge[(2, "n_edits")] == 12
    assert table[(table.request_set == "all") & (table.metric == "Score")]["round"].tolist() == [1, 2]


def test_compare_methods_reports_layerwise_collabedit_and_keeps_one_shot(sequential):
    from fedke.simulations.inprocess import ONE_SHOT_LABEL, compare_methods

    comparison = compare_methods(replace(sequential, num_rounds=1), methods=("collabedit", "fedavg"))
    summary = comparison.summary
    assert set(summary.index) == {"Unedited", "GlobalEdit", "CollabEdit", ONE_SHOT_LABEL, "FedAvg"}
    assert _rel(comparison.updates["CollabEdit"], comparison.updates["GlobalEdit"]) < 1e-6
    assert _rel(comparison.updates[ONE_SHOT_LABEL], comparison.updates["GlobalEdit"]) > 1e-4
    assert abs(summary.loc["CollabEdit", "Score"] - summary.loc["GlobalEdit", "Score"]) <= 0.5
    decoupled = compare_methods(replace(sequential, num_rounds=1, editor_mode="decoupled"), methods=("collabedit",),
                                include_unedited=False)
    assert set(decoupled.summary.index) == {"CollabEdit", "GlobalEdit"}


# ----------------------------------------------------------------------------- the ServerApp and ClientApp


def _run_apps(scenario, tmp_path, name):
    """fedke's ServerApp main over an in-memory grid whose nodes run fedke's ClientApp, each node with
    its own persistent Context: returns (strategy, results table, contexts)."""
    from test_streaming import _run_server_app  # the in-memory Grid of tests/test_streaming.py

    strategy, table, _, contexts = _run_server_app(scenario, tmp_path, name)
    return strategy, table, contexts


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_server_app_and_client_app_run_layerwise_end_to_end(sequential, in_process, tmp_path, streaming, monkeypatch):
    from fedke.editing.memit import MemitEditor
    from fedke.simulations.client import TARGETS_META

    optimised = []
    compute_targets = MemitEditor.compute_targets

    def counting(self, requests, **kwargs):
        optimised.append(len(requests))
        return compute_targets(self, requests, **kwargs)

    monkeypatch.setattr(MemitEditor, "compute_targets", counting)
    scenario = replace(sequential, streaming_aggregation=streaming)
    strategy, table, contexts = _run_apps(scenario, tmp_path, "streaming" if streaming else "legacy")
    # each ClientApp call builds a new client; the targets survive in Context.state: one
    # optimisation per client and edit round, not one per step
    assert optimised == [4] * (scenario.num_clients * scenario.num_rounds)
    assert strategy.steps_per_round == 2 and [m["server_round"] for m in strategy.round_metrics] == [1, 2, 3, 4]
    for name, update in in_process.strategy.global_update.items():  # arrival order: float64 rounding only
        np.testing.assert_allclose(strategy.global_update[name], update, rtol=1e-10, atol=1e-12)
    # every node kept its targets in its Context.state: those of its last edit round
    for node, context in contexts.items():
        assert context.state[TARGETS_META]["edit_round"] == 2, node
    # oracle, federated and merge rows: once per edit round, numbered by edit round
    for request_set in ("all", "federated", "merge"):
        rows = table[(table.request_set == request_set) & (table.metric.isin(["Score", "n_edits"]))]
        assert rows["round"].tolist() == [1, 2], request_set
    merge = table[table.request_set == "merge"].set_index(["round", "metric"])["value"]
    assert merge[(1, "n_targets_reused")] == merge[(2, "n_targets_reused")] == scenario.num_clients  # step 1
    oracle = table[table.request_set == "all"].set_index(["round", "metric"])["value"]
    reference = in_process.writer.table()
    reference = reference[reference.request_set == "all"].set_index(["round", "metric"])["value"]
    for key in reference.index:
        assert oracle[key] == pytest.approx(reference[key], abs=1e-6), key


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_at_edit_round_boundaries_and_resume(sequential, in_process, tmp_path):
    """The ServerApp's strategy driven as Flower's loop drives it, crashed mid edit round 2, resumed:
    the checkpoint holds edit round 1, the resumed run redoes edit round 2 and ends where an
    uninterrupted run ends."""
    from fedke.simulations.checkpoint import load_checkpoint
    from fedke.simulations.client_app import make_client
    from fedke.simulations.inprocess import LocalProxy, fit_result
    from fedke.simulations.server_app import server_fn
    from flwr.server.client_manager import SimpleClientManager

    run = replace(sequential, checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"))

    def serve(scenario, crash_after=None):
        states = {str(cid): RecordDict() for cid in range(scenario.num_clients)}  # a fresh process per run
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=scenario.to_run_config())
        components = server_fn(context)
        strategy, num_rounds = components.strategy, components.config.num_rounds
        manager = SimpleClientManager()
        for cid in states:
            manager.register(LocalProxy(cid))
        parameters = strategy.initialize_parameters(manager)
        seen = []
        for flower_round in range(1, num_rounds + 1):
            results = []
            for proxy, ins in strategy.configure_fit(flower_round, parameters, manager):
                seen.append((ins.config["server_round"], ins.config["layer_step"]))
                client = make_client(scenario, int(proxy.cid), state=states[proxy.cid])
                results.append((proxy, fit_result(*client.fit(parameters_to_ndarrays(ins.parameters), ins.config))))
            parameters, _ = strategy.aggregate_fit(flower_round, results, [])
            strategy.evaluate(flower_round, parameters)
            evaluations = []
            for proxy, ins in strategy.configure_evaluate(flower_round, parameters, manager):
                client = make_client(scenario, int(proxy.cid), state=states[proxy.cid])
                loss, count, metrics = client.evaluate(parameters_to_ndarrays(ins.parameters), ins.config)
                evaluations.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, count, metrics)))
            strategy.aggregate_evaluate(flower_round, evaluations, [])
            if crash_after is not None and flower_round == crash_after:
                break
        return num_rounds, sorted(set(seen)), strategy

    num_rounds, seen, _ = serve(run, crash_after=3)  # edit round 1 (steps 0, 1), then step 0 of edit round 2
    assert num_rounds == 4 and seen == [(1, 0), (1, 1), (2, 0)]
    crashed = load_checkpoint(run.checkpoint_dir)
    assert crashed.round == 1 and not crashed.finished
    num_rounds, seen, strategy = serve(replace(run, resume=True))
    assert num_rounds == 2 and seen == [(2, 0), (2, 1)]
    final = load_checkpoint(run.checkpoint_dir)
    assert final.round == 2 and final.finished
    for name, update in in_process.strategy.global_update.items():
        np.testing.assert_allclose(final.strategy_state["arrays"][f"global_update/{name}"], update, rtol=1e-10, atol=1e-12)
    assert {row["round"] for row in final.rows if row["request_set"] == "federated"} == {1, 2}
    assert [m["server_round"] for m in final.strategy_state["meta"]["round_metrics"]] == [1, 2, 3, 4]


def test_multiround_dynamic_covariance_with_a_resume_equals_layerwise_global_edit(sequential, tmp_path):
    """run_multiround (forgetting, dynamic C) goes layer-wise too: CollabEdit equals Global-Edit
    (one client, also layer-wise) round by round, and stopping after edit round 1 then resuming
    from its checkpoint changes nothing."""
    from fedke.simulations.multiround import run_multiround

    forgetting = replace(sequential, forgetting=True, covariance="dynamic", num_rounds=3, edits_per_client=2,
                         output_dir=str(tmp_path / "out"))
    checkpointed = replace(forgetting, checkpoint_dir=str(tmp_path / "ckpt"))
    stopped = run_multiround(checkpointed, stop_after=1, write=False)
    assert stopped.strategy.steps_per_round == 2 and stopped.strategy.rounds_merged == 2
    resumed = run_multiround(replace(checkpointed, resume=True), write=False)
    assert resumed.first_round == 2
    global_run = run_multiround(replace(forgetting, strategy="global"), write=False)
    # equal up to float32 weight rounding (three clients' sums vs one client's: a last bit of a weight
    # can differ, and the next layer's keys see it), as in the round-by-round test above
    assert _rel(resumed.strategy.global_update, global_run.strategy.global_update) < 1e-6
    assert _rel(resumed.strategy.kkt_total, global_run.strategy.kkt_total) < 1e-6
    rows = pd.DataFrame(resumed.writer.rows)
    assert sorted(set(rows[rows.request_set == "old"]["round"])) == [1, 2, 3]


# ----------------------------------------------------------------------------- MEMIT passes


@pytest.mark.slow
def test_passes_walk_the_layers_again_and_equal_sequential_global_edit_with_passes(sequential, tiny_bed):
    """passes = 2: an edit round is 2 x L steps; with dynamic covariance over two edit rounds the
    strategy path equals the driver and sequential Global-Edit with two passes and the same A_t."""
    from fedke.simulations.client_app import make_client
    from fedke.simulations.inprocess import LocalProxy, run_edit_round
    from fedke.simulations.wiring import build_strategy
    from fedke.strategies import LayerwiseCollabEdit

    scenario = replace(sequential, passes=2, covariance="dynamic", beta0=1.0, beta1=0.5)
    strategy = build_strategy(scenario, evaluate=False, wait_for_clients=False)
    assert isinstance(strategy, LayerwiseCollabEdit) and strategy.passes == 2
    n_layers = len(strategy.layer_specs)
    assert strategy.steps_per_round == 2 * n_layers
    assert strategy.fit_config(n_layers + 1, "0") == {"server_round": 1, "layer_step": n_layers,
                                                      "layer_steps": 2 * n_layers}
    assert [spec.name for spec in strategy.reply_specs(n_layers + 1)] == [strategy.layer_names[0]]
    editor = tiny_bed.editor(**scenario.memit_overrides())
    assert editor.config.passes == 2
    clients = [make_client(scenario, cid) for cid in range(scenario.num_clients)]
    proxies = [LocalProxy(str(cid)) for cid in range(len(clients))]
    a0 = editor.regularisers()
    previous, kkt_total = {}, {name: 0.0 for name in a0}
    for edit_round in (1, 2):
        requests = _requests(scenario, edit_round)
        metrics = run_edit_round(strategy, clients, proxies, edit_round)
        assert [m["layer_step"] for m in metrics] == list(range(2 * n_layers)) and all(m["applied"] for m in metrics)
        merged = {name: strategy.global_update[name] - previous.get(name, 0.0) for name in strategy.global_update}
        regs = {name: a0[name] + 0.5 * kkt_total[name] for name in a0}  # A_t of eq. 7
        driver = layerwise_collab_edit(editor, requests, regularisers=regs, base_update=previous or None)
        assert _rel(merged, driver) < 1e-9, edit_round
        with applied_update(tiny_bed.model, previous):
            payload = editor.edit([r for rs in requests for r in rs], regularisers=regs)
        assert _rel(merged, payload.deltas()) < 1e-6, edit_round
        for name, layer in payload.layers.items():  # kkt_total holds the first pass's K K^T only
            kkt_total[name] = kkt_total[name] + layer.kkt
        assert _rel(strategy.kkt_total, kkt_total) < 1e-6, edit_round
        previous = {name: update.copy() for name, update in strategy.global_update.items()}
    # one pass less is a different edit: the second pass really ran
    one_pass = tiny_bed.editor(**replace(scenario, passes=1).memit_overrides())
    assert _rel(layerwise_collab_edit(one_pass, _requests(scenario, 1)), layerwise_collab_edit(editor, _requests(scenario, 1))) > 1e-3


def test_passes_need_the_layerwise_protocol_and_the_same_setting_on_both_sides(sequential):
    from fedke.simulations.checkpoint import fingerprint_config
    from fedke.simulations.client_app import make_client
    from fedke.simulations.wiring import build_strategy

    with pytest.raises(ValueError, match="needs the layer-wise protocol"):
        replace(sequential, passes=2, editor_mode="decoupled")
    with pytest.raises(ValueError, match="needs the layer-wise protocol"):
        replace(sequential, passes=2, layerwise="false")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="passes must be at least 1"):
            replace(sequential, passes=bad)
    assert replace(sequential, passes=3, strategy="ties", editor_mode="decoupled").passes == 3  # baselines merge deltas
    assert "passes" not in fingerprint_config(sequential)
    assert fingerprint_config(replace(sequential, passes=2))["passes"] == 2
    strategy = build_strategy(replace(sequential, passes=2), evaluate=False, wait_for_clients=False)
    parameters, config = parameters_to_ndarrays(strategy.fit_parameters(1)), strategy.fit_config(1, "0")
    with pytest.raises(ValueError, match="set the same passes on both"):
        make_client(sequential, 0).fit(parameters, config)  # a one-pass client asked for 2 x L steps

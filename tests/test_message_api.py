"""fedke under Flower's Message API: the named-array wire form (fedke.records), the strategies of
fedke.strategies.message driven by Flower's own ``Strategy.start`` over an in-memory Grid whose nodes
are fedke's ClientApp, and their equality with the legacy path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedke.codec import PayloadError, decode_payload, encode_payload, pack_upper
from fedke.records import (layer_step_from_named, layer_step_to_named, payload_from_named, payload_to_named,
                           update_from_named, update_to_named)
from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers, synthetic_specs
from fedke.strategies import message as message_strategies
from fedke.strategies.message import MessageEditStrategy

SPECS = synthetic_specs(d_in=6, d_out=4, layers=2)
NAMES = [spec.name for spec in SPECS]


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp run sets before a strategy builds its Messages."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


# ----------------------------------------------------------------------------- fedke.records


def test_a_named_payload_decodes_to_what_the_listed_one_decodes_to():
    payload = synthetic_payload(SPECS, 3, seed=1, with_delta=True)
    named = payload_to_named(payload)
    assert list(named) == [f"{n}/{kind}" for n in NAMES for kind in ("delta", "kkt_upper", "rkt")] + ["residual_norms"]
    assert all(array.dtype == np.float32 for array in named.values())
    got = payload_from_named(named, n_edits=3, expected=SPECS)
    want = decode_payload(encode_payload(payload), expected=SPECS)
    assert got.n_edits == want.n_edits == 3
    np.testing.assert_array_equal(got.residual_norms, want.residual_norms)
    for name in NAMES:
        for kind in ("delta", "kkt", "rkt"):
            np.testing.assert_array_equal(getattr(got.layers[name], kind), getattr(want.layers[name], kind))
    # without delta (layer-wise steps), float64 on the wire
    lean = payload_to_named(payload, send_delta=False, dtype=np.float64)
    assert not any(key.endswith("/delta") for key in lean)
    back = payload_from_named(lean, n_edits=3, expected=SPECS, require=("rkt",))
    assert back.layers[NAMES[0]].delta is None
    np.testing.assert_array_equal(back.layers[NAMES[0]].kkt, payload.layers[NAMES[0]].kkt)


def test_updates_and_layer_steps_round_trip_by_name():
    rng = np.random.default_rng(0)
    update = {spec.name: rng.normal(size=(spec.d_out, spec.d_in)) for spec in SPECS}
    named = update_to_named(update, dtype=np.float64)
    assert list(named) == [f"{n}/update" for n in NAMES]
    back = update_from_named(named, expected=SPECS)
    assert all(np.array_equal(back[n], update[n]) for n in NAMES)
    merged = {NAMES[0]: update[NAMES[0]] * 2}
    start, done = layer_step_from_named(layer_step_to_named(update, merged, dtype=np.float64), expected=SPECS,
                                        merged_expected=SPECS[:1])
    assert all(np.array_equal(start[n], update[n]) for n in NAMES) and np.array_equal(done[NAMES[0]], merged[NAMES[0]])
    with pytest.raises(PayloadError, match="layer set differs"):
        update_from_named({f"{NAMES[0]}/update": update[NAMES[0]]}, expected=SPECS)
    with pytest.raises(PayloadError, match="round_start and merged arrays only"):
        layer_step_from_named({**named}, expected=SPECS, merged_expected=[])


@pytest.mark.parametrize("mutate, pattern", [
    (lambda named: named.pop("residual_norms"), "'residual_norms' missing"),
    (lambda named: named.update({"h.9/delta": np.zeros((4, 6), np.float32)}), "layer 'h.9' is not edited"),
    (lambda named: named.update({f"{NAMES[0]}/keys": np.zeros((4, 6), np.float32)}), "unknown kind 'keys'"),
    (lambda named: named.update({"delta": np.zeros((4, 6), np.float32)}), "expected a name '<layer>/<kind>'"),
    (lambda named: named.pop(f"{NAMES[1]}/kkt_upper"), "manifest: layer .* lists arrays"),
    (lambda named: [named.pop(key) for key in list(named) if key.startswith(NAMES[1])], "missing layers"),
    (lambda named: named.update({f"{NAMES[0]}/delta": np.zeros((6, 4), np.float32)}), "delta: wrong shape"),
    (lambda named: named.update({f"{NAMES[0]}/rkt": np.zeros((4, 6), np.float64)}), "rkt: dtype float64 but"),
    (lambda named: named.update({f"{NAMES[0]}/rkt": np.full((4, 6), np.nan, np.float32)}), "rkt: .*(NaN|non-finite)"),
    (lambda named: named.update({f"{NAMES[0]}/kkt_upper": pack_upper(-np.eye(6)).astype(np.float32)}),
     "kkt: not positive semi-definite"),
])
def test_a_bad_named_payload_is_refused_naming_what_is_wrong(mutate, pattern):
    named = payload_to_named(synthetic_payload(SPECS, 3, seed=2, with_delta=True))
    mutate(named)
    with pytest.raises(PayloadError, match=pattern):
        payload_from_named(named, n_edits=3, expected=SPECS)


@pytest.mark.parametrize("n_edits", [-1, 2.5, "3", True, None, 2 ** 60])
def test_the_edit_count_must_be_a_count(n_edits):
    named = payload_to_named(synthetic_payload(SPECS, 3, seed=2, with_delta=True))
    with pytest.raises(PayloadError, match="num-examples|n_edits"):
        payload_from_named(named, n_edits=n_edits, expected=SPECS, max_edits=100)


# ----------------------------------------------------------------------------- an in-memory Grid


class Grid:
    """Flower's Grid for a ``Strategy.start`` in this process: ``nodes[node_id](message, context)`` is a
    ClientApp (or any callable) answering each message; every node keeps its own Context."""

    def __init__(self, nodes, run_config=None):
        self.nodes = nodes
        self.contexts = {node: Context(run_id=7, node_id=node, node_config={"partition-id": node - 1},
                                       state=RecordDict(), run_config=dict(run_config or {})) for node in nodes}
        self.counter = 0
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.counter += 1
            message.metadata.__dict__["_message_id"] = f"m{self.counter}"
            self.sent.append(message)
            node = message.metadata.dst_node_id
            try:
                replies.append(self.nodes[node](message, self.contexts[node]))
            except Exception as error:  # noqa: BLE001 - a ClientApp that raises: an error reply
                replies.append(Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message))
        return replies


def reply_with(named, metrics):
    return lambda message, context: Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in named.items()}),
                                                        "metrics": MetricRecord(metrics)}), reply_to=message)


def test_message_collabedit_merges_as_the_legacy_strategy_and_refuses_bad_replies(task_identity):
    regs = synthetic_regularisers(SPECS, 2.0)
    payloads = [synthetic_payload(SPECS, 3, seed=seed, with_delta=True, lam=2.0) for seed in range(3)]
    good = {node: reply_with(payload_to_named(p), {"num-examples": 3, "edit_seconds": 0.5})
            for node, p in enumerate(payloads, start=1)}
    bad_arrays = payload_to_named(payloads[0])
    bad_arrays[f"{NAMES[0]}/rkt"] = np.full((4, 6), np.inf, np.float32)

    def raises(message, context):
        raise RuntimeError("the node's editor crashed")

    def pickled(message, context):
        array = Array(np.zeros(3, np.float32))
        array.data = b"\x80\x04not an npy"
        return Message(RecordDict({"arrays": ArrayRecord({"residual_norms": array}),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=message)

    nodes = {**good, 4: reply_with(bad_arrays, {"num-examples": 3}), 5: raises, 6: pickled,
             7: reply_with(payload_to_named(payloads[1]), {"num-examples": 3.5})}
    strategy = message_strategies.CollabEdit(layer_specs=SPECS, regularisers=regs, min_fit_clients=1,
                                             min_available_clients=1, fraction_evaluate=0.0)
    result = strategy.start(grid=Grid(nodes), initial_arrays=strategy.initial_arrays(), num_rounds=1)
    metrics = strategy.inner.round_metrics[-1]
    assert metrics["n_accepted"] == 3 and metrics["n_rejected"] == 3 and metrics["n_failures"] == 1
    reasons = dict(strategy.inner.last_rejections)
    assert "rkt" in reasons["4"] and "not a plain NumPy .npy array" in reasons["6"] and "num-examples" in reasons["7"]
    assert "the node's editor crashed" in strategy.inner.last_failures[0]

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedke.strategies import CollabEdit

    # the same payloads through the legacy codec: the same float32 wire values, so the same merge
    legacy = CollabEdit(layer_specs=SPECS, regularisers=regs, min_fit_clients=1, min_available_clients=1)
    _, legacy_metrics = legacy.aggregate_fit(1, [(SimpleNamespace(cid=str(i)), FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(encode_payload(p)), 3, {})) for i, p in enumerate(payloads)], [])
    for name in NAMES:
        np.testing.assert_array_equal(strategy.global_update[name], legacy.global_update[name])
        np.testing.assert_array_equal(result.arrays[f"{name}/update"].numpy(),
                                      legacy.global_update[name].astype(np.float32))
    assert result.train_metrics_clientapp[1]["n_edits"] == 9 == legacy_metrics["n_edits"]


@pytest.mark.parametrize("kind", ["fedavg", "task_arithmetic", "ties"])
def test_message_baselines_merge_deltas_as_the_legacy_ones(kind, task_identity):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedke import strategies as legacy_strategies

    payloads = [synthetic_payload(SPECS, n, seed=n, with_delta=True) for n in (2, 3, 5)]
    cls = {"fedavg": "FedAvg", "task_arithmetic": "TaskArithmetic", "ties": "TIES"}[kind]
    options = dict(layer_specs=SPECS, min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0)
    strategy = getattr(message_strategies, cls)(**options)
    nodes = {i: reply_with(payload_to_named(p), {"num-examples": p.n_edits}) for i, p in enumerate(payloads, start=1)}
    strategy.start(grid=Grid(nodes), initial_arrays=strategy.initial_arrays(), num_rounds=2)
    legacy = getattr(legacy_strategies, cls)(**options)
    replies = [(SimpleNamespace(cid=str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encode_payload(p)),
                                                    p.n_edits, {})) for i, p in enumerate(payloads, start=1)]
    for server_round in (1, 2):
        legacy.aggregate_fit(server_round, replies, [])
    for name in NAMES:
        np.testing.assert_allclose(strategy.global_update[name], legacy.global_update[name], rtol=0, atol=0)
    assert isinstance(strategy, MessageEditStrategy) and strategy.inner.rounds_merged == 2


# ----------------------------------------------------------------------------- fedke's ClientApp, both styles


def _tiny(cache_dir, **overrides):
    from fedke.simulations.scenario import Scenario

    return Scenario.from_preset("tiny", cache_dir=str(cache_dir), num_rounds=1, **overrides)


@pytest.mark.parametrize("mode", ["decoupled", "sequential"])
def test_the_clientapp_answers_message_api_strategies_as_it_answers_the_legacy_loop(mode, tiny_bed, cache_dir,
                                                                                     task_identity, tmp_path):
    """fedke's own ClientApp (both server styles in one app) under a Message-API CollabEdit equals the
    in-process legacy loop on the same scenario: the same merged update (float32 wire values) and metrics.
    Sequential MEMIT runs layer-wise (two server rounds on the tiny model, targets kept in context.state)."""
    from fedke.simulations.client_app import app
    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.wiring import build_strategy

    scenario = _tiny(cache_dir, editor_mode=mode, output_dir=str(tmp_path / "legacy"))
    reference = run_in_process(scenario, write=False)
    message_scenario = replace(scenario, flower_api="message", output_dir=str(tmp_path / "message"))
    inner = build_strategy(message_scenario, evaluate=False, wait_for_clients=False)
    strategy = MessageEditStrategy(inner)
    grid = Grid({node: app for node in range(1, scenario.num_clients + 1)}, message_scenario.to_run_config())
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=inner.steps_per_round)
    assert all(message.metadata.message_type in ("train", "evaluate") for message in grid.sent)
    assert all("arrays" in m.content.array_records for m in grid.sent)
    want = reference.strategy.global_update
    for name, update in strategy.global_update.items():
        np.testing.assert_allclose(update, want[name], rtol=1e-6, atol=1e-9)
    assert strategy.inner.round_metrics[-1]["n_edits"] == reference.strategy.round_metrics[-1]["n_edits"] == 12
    if mode == "sequential":
        assert strategy.inner.round_metrics[-1]["n_targets_reused"] == 3  # step 1 reused step 0's targets


def test_a_message_api_run_refuses_what_stays_on_the_legacy_path(cache_dir):
    from fedke.simulations.scenario import ConfigError

    for overrides, named in ((dict(secure_aggregation=True), "secure-aggregation"),
                             (dict(conflict_detection="hmac", conflict_secret="s" * 32), "conflict-detection"),
                             (dict(streaming_aggregation=True), "streaming-aggregation"),
                             (dict(checkpoint_dir=str(cache_dir / "ckpt")), "checkpoint-dir")):
        with pytest.raises(ConfigError, match=f"flower-api = 'message' does not combine with {named}"):
            _tiny(cache_dir, flower_api="message", **overrides)
    with pytest.raises(ConfigError, match="flower-api must be one of 'legacy', 'message'"):
        _tiny(cache_dir, flower_api="new")


def test_a_legacy_message_still_reaches_the_numpy_client(tiny_bed, cache_dir, task_identity):
    """The mod passes the legacy loop's messages (fitins.*) on: ``is_message_api`` tells them apart."""
    from flwr.common import FitIns, Parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedke.simulations.message_client import is_message_api

    legacy = Message(compat.fitins_to_recorddict(FitIns(Parameters([], "numpy.ndarray"), {"server_round": 1}),
                                                 keep_input=True), dst_node_id=1, message_type="train")
    new = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord()}),
                  dst_node_id=1, message_type="train")
    assert not is_message_api(legacy) and is_message_api(new)


# ----------------------------------------------------------------------------- the README's new-style app

README = Path(__file__).resolve().parents[1] / "README.md"

#: common.py of the README's app, on the tiny world model instead of a model directory (the README's
#: own common.py loads a Hugging Face model from model-path; the apps below are the README's verbatim).
TINY_COMMON = '''
from fedke.codec import LayerSpec
from fedke.data.world import WorldConfig
from fedke.testbed import load_testbed
from fedke.worldmodel import WorldModelConfig

def load_editor(run_config):
    bed = load_testbed(WorldConfig(n_subjects=120, n_relations=3, seed=0), WorldModelConfig(n_layer=3, n_embd=64, n_head=2),
                       cache_dir=run_config["cache-dir"], progress=False)
    editor = bed.editor(lam=float(run_config["lam"]))
    specs = [LayerSpec(name, *shape) for name, shape in editor.layer_shapes().items()]
    return bed.model, bed.tokenizer, editor, specs
'''

APP_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "my-app"
version = "0.1.0"
dependencies = ["fedke"]

[tool.flwr.app]
publisher = "me"

[tool.flwr.app.components]
serverapp = "my_app.server_app:app"
clientapp = "my_app.client_app:app"

[tool.flwr.app.config]
cache-dir = ""
requests-path = ""
update-path = ""
merge = "collabedit"
lam = 30.0
num-clients = 2
num-rounds = 1
'''


def readme_block(marker: str) -> str:
    """The README's python block whose first line is ``marker``."""
    import re

    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(marker):
            return block
    raise AssertionError(f"no python block starting with {marker!r} in the README")


def write_readme_app(root, cache_dir, cases_by_partition):
    import json

    package = root / "my_app"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(APP_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text(TINY_COMMON)
    (package / "client_app.py").write_text(readme_block("# client_app.py (Message API)"))
    (package / "server_app.py").write_text(readme_block("# server_app.py (Message API)"))
    requests = {str(p): [{"prompt": c.request.prompt, "subject": c.request.subject, "target_new": c.request.target_new}
                         for c in cases] for p, cases in cases_by_partition.items()}
    (root / "requests.json").write_text(json.dumps(requests))
    return {"cache-dir": str(cache_dir), "requests-path": str(root / "requests.json")}


@pytest.mark.slow
def test_the_readme_message_api_app_runs_collabedit_and_fedavg_under_flwr_run_and_a_deployment(tiny_bed, cache_dir,
                                                                                                 tmp_path):
    """The README's new-style client and server apps, verbatim, run under ``flwr run`` (CollabEdit) and
    against a loopback SuperLink with two SuperNodes (FedAvg); each saved update equals the legacy
    strategy's merge of the same clients' payloads (to float32), and CollabEdit's edits take."""
    from safetensors.numpy import load_file

    from fedke.codec import LayerSpec
    from fedke.editing.weights import applied_update
    from fedke.eval import evaluate_cases
    from fedke.merge import relative_update_error
    from fedke.simulations.client import EditClient
    from fedke.simulations.deploy import LoopbackDeployment
    from fedke.simulations.launch import run_app
    from fedke.simulations.runtime import dealt_cases_for
    from fedke.strategies import CollabEdit, FedAvg

    scenario = _tiny(cache_dir, num_clients=2)
    dealt = {client: cases for (client, r), cases in dealt_cases_for(scenario).items() if r == 1}
    config = write_readme_app(tmp_path / "app", cache_dir, dealt)
    editor = tiny_bed.editor(lam=30.0)
    specs = [LayerSpec(name, *shape) for name, shape in editor.layer_shapes().items()]
    clients = [EditClient(editor, tiny_bed.model, tiny_bed.tokenizer, {1: dealt[p]}) for p in (0, 1)]
    payloads = [client.edit({}, {"server_round": 1})[0] for client in clients]

    def expected(strategy):
        merged = strategy.merge(payloads)
        return {name: update.astype(np.float32) for name, update in merged.items()}

    runs = {"collabedit": expected(CollabEdit(layer_specs=specs, regularisers=editor.regularisers())),
            "fedavg": expected(FedAvg(layer_specs=specs))}
    out = {name: tmp_path / f"{name}.safetensors" for name in runs}
    run_app(tmp_path / "app", num_supernodes=2, run_config={**config, "update-path": str(out["collabedit"])},
            timeout_s=600, stream=False)
    with LoopbackDeployment(2, flwr_home=(tmp_path / "flwr-home").resolve()) as deployment:
        deployment.run(tmp_path / "app", run_config={**config, "merge": "fedavg", "update-path": str(out["fedavg"])},
                       timeout_s=600)
    for name, want in runs.items():
        got = load_file(str(out[name]))
        assert sorted(got) == sorted(f"{layer}/update" for layer in want)
        # the nodes edit in their own processes and threads (MKL rounds by batch shape) and send float32
        error = relative_update_error({layer: got[f"{layer}/update"] for layer in want}, want)
        print(f"{name}: relative error of the README app's update vs the legacy merge {error:.3g}")
        assert error <= 1e-5, (name, error)
    update = {key.rsplit("/", 1)[0]: value.astype(np.float64) for key, value in load_file(str(out["collabedit"])).items()}
    with applied_update(tiny_bed.model, update):
        summary = evaluate_cases(tiny_bed.model, tiny_bed.tokenizer, dealt[0] + dealt[1]).summary
    assert summary["ES"] >= 80

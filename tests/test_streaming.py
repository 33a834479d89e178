"""The streaming fit stage (fedke.simulations.streaming): the same merge as the legacy loop, one
reply alive at a time, failures and bad replies handled as the legacy loop handles them.

A fake in-memory Grid stands in for the SuperLink: a node answers a TRAIN message only when the
message is pulled (so a reply exists in the server's process only once pulled), and the legacy
path runs Flower's own ``Server.fit_round`` over Flower's ``GridClientProxy`` on the same grid.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import threading
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common import Code, Context, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Server, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedke.badpayloads import bad_payload_corpus
from fedke.codec import encode_payload
from fedke.simulations.streaming import StreamingServer, stream_fit
from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers, synthetic_specs
from fedke.strategies import CollabEdit, FedAvg

SPECS = synthetic_specs(d_in=24, d_out=8, layers=2)
TIMINGS = ("decode_seconds", "merge_seconds", "aggregate_seconds")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What ``start_grid`` sets before the server loop runs (Messages are stamped with it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def good_res(seed: int, n_edits: int = 3) -> FitRes:
    payload = synthetic_payload(SPECS, n_edits, seed=seed, with_delta=True)
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encode_payload(payload)), n_edits, {"n_skipped": 1})


class FakeGrid:
    """An in-memory Grid. ``answers[node_id](message)`` gives the reply (a FitRes, an Exception for an
    error reply, or None for a node that never answers), computed when the message is pulled."""

    def __init__(self, answers):
        self.answers = answers
        self.run = SimpleNamespace(run_id=7)
        self.inbox: dict[str, Message] = {}
        self.counter = 0
        self.pulled: list[weakref.ref] = []  # every reply handed out
        self.max_alive = 0  # most replies alive at once in this process (at a pull)
        self.reply_order: list[int] = []  # destination node of every reply handed out, in order
        self.pushed: list[tuple[int, str, float]] = []  # (node, group_id, ttl) of every pushed message
        self.blocking_types: list[str] = []  # message types sent through send_and_receive (the legacy proxy)
        # one node at a time: the legacy loop pulls from several threads, and the in-process
        # ClientApps share one cached model (a SuperLink's nodes are separate processes)
        self.lock = threading.RLock()

    def get_node_ids(self):
        return list(self.answers)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.counter += 1
            message_id = f"m{self.counter}"
            message.metadata.__dict__["_message_id"] = message_id
            self.inbox[message_id] = message
            self.pushed.append((message.metadata.dst_node_id, message.metadata.group_id, message.metadata.ttl))
            ids.append(message_id)
        return ids

    def _reply(self, message: Message) -> Message | None:
        answer = self.answers[message.metadata.dst_node_id](message)
        if answer is None:
            return None
        if isinstance(answer, BaseException):
            return Message(Error(code=0, reason=str(answer)), reply_to=message)
        if isinstance(answer, Message):
            return answer
        return Message(compat.fitres_to_recorddict(answer, keep_input=True), reply_to=message)

    def pull_messages(self, message_ids):
        with self.lock:
            return self._pull(message_ids)

    def _pull(self, message_ids):
        out = []
        for message_id in message_ids:
            message = self.inbox.get(message_id)
            if message is None:
                continue
            reply = self._reply(message)
            if reply is None:
                continue
            del self.inbox[message_id]
            gc.collect()
            alive = sum(ref() is not None for ref in self.pulled)
            self.pulled.append(weakref.ref(reply))
            self.max_alive = max(self.max_alive, alive + 1)
            self.reply_order.append(message.metadata.dst_node_id)
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.blocking_types.extend(m.metadata.message_type for m in messages)
        ids = set(self.push_messages(messages))
        out = []
        while ids:
            replies = self.pull_messages(ids)
            out.extend(replies)
            ids -= {reply.metadata.reply_to_message_id for reply in replies}
            if ids and timeout is not None:  # the SuperLink's TTL reply for a silent node
                out.extend(Message(Error(code=0, reason="timed out"), reply_to=self.inbox.pop(i)) for i in ids)
                break
        return out


class CountingCollabEdit(CollabEdit):
    """CollabEdit that records, at every reply it is fed, how many earlier replies (``FitRes``) and
    decoded payloads are still alive in the process (weak references, after a garbage collection)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.max_replies_alive = 0
        self.max_payloads_alive = 0

    def begin_round(self, server_round):
        aggregation = super().begin_round(server_round)
        strategy, replies, payloads = self, [], []
        add_reply, add = aggregation.add_reply, aggregation.merger.add

        def counting_add_reply(proxy, fit_res):
            gc.collect()
            alive = sum(ref() is not None for ref in replies) + 1
            strategy.max_replies_alive = max(strategy.max_replies_alive, alive)
            replies.append(weakref.ref(fit_res))
            return add_reply(proxy, fit_res)

        def counting_add(payload, weight):
            gc.collect()
            alive = sum(ref() is not None for ref in payloads) + 1
            strategy.max_payloads_alive = max(strategy.max_payloads_alive, alive)
            payloads.append(weakref.ref(payload))
            return add(payload, weight)

        aggregation.add_reply = counting_add_reply
        aggregation.merger.add = counting_add
        return aggregation


def collab(cls=CollabEdit, n=0, **kwargs):
    return cls(layer_specs=SPECS, regularisers=synthetic_regularisers(SPECS, 2.0), min_fit_clients=n,
               min_available_clients=n, min_evaluate_clients=0, fraction_evaluate=0.0, **kwargs)


def servers(strategy, grid, streaming: bool):
    manager = SimpleClientManager()
    for node_id in grid.get_node_ids():
        manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id))
    if streaming:
        return StreamingServer(client_manager=manager, strategy=strategy, poll_interval=0.0)
    return Server(client_manager=manager, strategy=strategy)


def same_metrics(a, b):
    return {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}


# ----------------------------------------------------------------------------- equality


def test_streaming_equals_aggregate_fit_in_arrival_order_bit_for_bit():
    """The streamed round is aggregate_fit fed the same replies in the order they arrived: same bits."""
    replies = {node: good_res(node) for node in (11, 12, 13, 14)}
    grid = FakeGrid({node: (lambda m, r=res: r) for node, res in replies.items()})
    streamed = collab(n=4)
    server = servers(streamed, grid, streaming=True)
    reference = collab(n=4)
    for server_round in (1, 2):
        grid.reply_order.clear()
        _, metrics, (results, failures) = server.fit_round(server_round, timeout=None)
        assert results == [] and failures == []  # nothing keeps the replies
        assert sorted(grid.reply_order) == sorted(replies)
        in_order = [(SimpleNamespace(cid=str(node)), good_res(node)) for node in grid.reply_order]
        _, expected = reference.aggregate_fit(server_round, in_order, [])
    for name in reference.global_update:
        assert np.array_equal(streamed.global_update[name], reference.global_update[name]), name
        assert np.array_equal(streamed.kkt_total[name], reference.kkt_total[name]), name
    assert same_metrics(metrics, expected) and metrics["n_accepted"] == 4 and metrics["n_skipped"] == 4
    assert [same_metrics(a, b) for a, b in zip(streamed.round_metrics, reference.round_metrics)] == [True, True]


def test_streaming_server_equals_the_legacy_server_loop():
    """Flower's legacy Server.fit_round vs StreamingServer on the same grid: same merge and metrics."""
    answers = {node: (lambda m, s=node: good_res(s)) for node in (1, 2, 3)}
    legacy, streamed = collab(n=3), collab(n=3)
    for strategy, streaming in ((legacy, False), (streamed, True)):
        server = servers(strategy, FakeGrid(answers), streaming)
        for server_round in (1, 2):
            parameters, metrics, _ = server.fit_round(server_round, timeout=None)
            assert metrics["applied"]
    for name in legacy.global_update:  # arrival order may differ: float64 rounding only
        np.testing.assert_allclose(streamed.global_update[name], legacy.global_update[name], rtol=1e-13, atol=1e-15)
    for a, b in zip(legacy.round_metrics, streamed.round_metrics):
        for key in ("n_results", "n_accepted", "n_rejected", "n_failures", "n_edits", "applied", "residual_norm_count"):
            assert a[key] == b[key], key
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-12)


# ----------------------------------------------------------------------------- failures and bad replies


def _mixed_answers():
    """Good clients, every bad reply of the corpus, a client that raises, one with a non-OK status."""
    good = synthetic_payload(SPECS, 3, seed=99, with_delta=True)
    answers, expected_rejections = {}, {}
    for node in (1, 2, 3):
        answers[node] = lambda m, s=node: good_res(s)
    node = 100
    failures = 0
    for case in bad_payload_corpus(good):
        if case.reply is None:  # a failure Flower hands the strategy: the client's error reply here
            answers[node] = lambda m, e=case.failure: RuntimeError(str(e))
            failures += 1
        elif case.reply.status.code != Code.OK:
            answers[node] = lambda m, r=case.reply: r
            failures += 1
        else:
            answers[node] = lambda m, r=case.reply: r
            expected_rejections[str(node)] = case.reason
        node += 1
    answers[node] = lambda m: RuntimeError("client crashed")
    failures += 1
    return answers, expected_rejections, failures


@pytest.mark.slow
def test_bad_replies_and_failures_are_handled_as_the_legacy_loop_does(caplog):
    answers, expected_rejections, n_failures = _mixed_answers()
    outcomes = {}
    for streaming in (False, True):
        strategy = collab()
        server = servers(strategy, FakeGrid(answers), streaming)
        with caplog.at_level(logging.WARNING):
            _, metrics, _ = server.fit_round(1, timeout=None)
        outcomes[streaming] = (strategy, metrics)
        assert metrics["applied"] and metrics["n_accepted"] == 3
        assert metrics["n_rejected"] == len(expected_rejections) and metrics["n_failures"] == n_failures
        rejections = dict(strategy.last_rejections)
        assert set(rejections) == set(expected_rejections)
        for cid, reason in expected_rejections.items():
            assert re.search(reason, rejections[cid]), (cid, reason, rejections[cid])
    (legacy, lm), (streamed, sm) = outcomes[False], outcomes[True]
    assert sorted(legacy.last_failures) == sorted(streamed.last_failures)
    assert sorted(legacy.last_rejections) == sorted(streamed.last_rejections)
    for name in legacy.global_update:
        np.testing.assert_allclose(streamed.global_update[name], legacy.global_update[name], rtol=1e-13, atol=1e-15)
    # and the merge is that of the three good clients alone
    only_good = collab()
    only_good.aggregate_fit(1, [(SimpleNamespace(cid=str(n)), good_res(n)) for n in (1, 2, 3)], [])
    for name in only_good.global_update:
        np.testing.assert_allclose(streamed.global_update[name], only_good.global_update[name], rtol=1e-13, atol=1e-15)


def test_a_silent_node_becomes_a_failure_at_the_round_timeout():
    grid = FakeGrid({1: lambda m: good_res(1), 2: lambda m: None, 3: lambda m: good_res(3)})
    strategy = collab()
    aggregation = strategy.begin_round(1)
    proxies = [GridClientProxy(node_id=n, grid=grid, run_id=7) for n in (1, 2, 3)]
    ins = strategy.configure_fit(1, None, SimpleNamespace(num_available=lambda: 3, sample=lambda **_: proxies))
    now = [0.0]

    def sleep(seconds):
        now[0] += 1.0

    counts = stream_fit(aggregation, ins, timeout=10.0, group_id=1, poll_interval=1.0, timeout_grace=2.0,
                        sleep=sleep, clock=lambda: now[0])
    _, metrics = aggregation.finish()
    assert counts == {"pushed": 3, "replies": 2, "failures": 1, "timed_out": 1}
    assert 12.0 <= now[0] <= 13.0  # gave up at timeout + grace, not before
    assert metrics["applied"] and metrics["n_accepted"] == 2 and metrics["n_failures"] == 1
    assert "TimeoutError" in strategy.last_failures[0] and "node 2" in strategy.last_failures[0]
    # the TTL message the SuperLink sends is set from the round timeout, as the legacy proxy does
    assert sorted(grid.pushed) == [(1, "1", 10.0), (2, "1", 10.0), (3, "1", 10.0)]


def test_a_failed_push_is_a_failure_of_that_node():
    class BrokenPush(FakeGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages[0].metadata.dst_node_id == 2:
                raise ConnectionError("SuperLink unreachable")
            return super().push_messages(messages)

    grid = BrokenPush({1: lambda m: good_res(1), 2: lambda m: good_res(2)})
    strategy = collab(n=2)
    _, metrics, _ = servers(strategy, grid, streaming=True).fit_round(1, timeout=None)
    assert metrics["n_accepted"] == 1 and metrics["n_failures"] == 1
    assert "ConnectionError: SuperLink unreachable" in strategy.last_failures[0]


def test_a_resumed_run_streams_with_shifted_round_numbers():
    from fedke.simulations.resume import ResumableStrategy

    inner = collab(n=2)
    wrapped = ResumableStrategy(inner, scenario=None, writer=None, rounds_done=3)
    grid = FakeGrid({n: (lambda m, s=n: good_res(s)) for n in (1, 2)})
    _, metrics, _ = servers(wrapped, grid, streaming=True).fit_round(1, timeout=None)
    assert metrics["applied"] and [m["server_round"] for m in inner.round_metrics] == [4]
    assert [group for _, group, _ in grid.pushed] == ["1", "1"]  # Flower's own round number on the wire


def test_streaming_needs_a_strategy_with_begin_round():
    from flwr.server.strategy import FedAvg as FlowerFedAvg

    with pytest.raises(TypeError, match="begin_round"):
        StreamingServer(client_manager=SimpleClientManager(), strategy=FlowerFedAvg())


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
@pytest.mark.parametrize("n_clients", [2, 6])
def test_at_most_one_reply_is_alive_at_a_time(n_clients):
    """Streaming: one pulled reply, one FitRes and one decoded payload alive at a time, whatever N.
    The legacy loop holds every FitRes until aggregate_fit (what the test would see if streaming hoarded)."""
    answers = {node: (lambda m, s=node: good_res(s)) for node in range(1, n_clients + 1)}
    seen = {}
    for streaming in (False, True):
        grid = FakeGrid(answers)
        strategy = collab(CountingCollabEdit, n=n_clients)
        _, metrics, _ = servers(strategy, grid, streaming).fit_round(1, timeout=None)
        assert metrics["n_accepted"] == n_clients
        seen[streaming] = (grid.max_alive, strategy.max_replies_alive, strategy.max_payloads_alive)
    assert seen[True] == (1, 1, 1)
    assert seen[False][1] == n_clients and seen[False][2] == 1  # legacy: all FitRes held, decoded one by one


def test_fedavg_streams_too():
    grid = FakeGrid({n: (lambda m, s=n: good_res(s)) for n in (1, 2)})
    strategy = FedAvg(layer_specs=SPECS, min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0)
    _, metrics, _ = servers(strategy, grid, streaming=True).fit_round(1, timeout=None)
    reference = FedAvg(layer_specs=SPECS, min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0)
    reference.aggregate_fit(1, [(SimpleNamespace(cid=str(n)), good_res(n)) for n in (1, 2)], [])
    assert metrics["applied"]
    for name in reference.global_update:
        assert np.array_equal(strategy.global_update[name], reference.global_update[name])


# ----------------------------------------------------------------------------- the ServerApp, tiny preset


def _run_server_app(scenario, tmp_path, name):
    """fedke's ServerApp main over a fake grid whose nodes run fedke's real ClientApp in process, each
    node with its own persistent Context (as a SuperNode keeps it): returns (strategy, results table,
    grid, contexts)."""
    from fedke.simulations import client_app, server_app

    out = tmp_path / name
    run_config = replace(scenario, output_dir=str(out)).to_run_config()
    contexts = {node: Context(run_id=7, node_id=node, node_config={"partition-id": node - 1}, state=RecordDict(),
                              run_config=run_config) for node in range(1, scenario.num_clients + 1)}

    def answer(message, node):
        return client_app.app(message, contexts[node])

    grid = FakeGrid({node: (lambda m, n=node: answer(m, n)) for node in contexts})
    strategies = []
    original = server_app.build_strategy

    def keep(*args, **kwargs):
        strategies.append(original(*args, **kwargs))
        return strategies[-1]

    server_app.build_strategy = keep
    try:
        server_app.main(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    finally:
        server_app.build_strategy = original
    import pandas as pd

    table = pd.read_csv(out / "results.csv", keep_default_na=False, dtype={"metric": str, "method": str})
    return strategies[0], table, grid, contexts


@pytest.mark.slow
def test_server_app_streaming_equals_legacy_on_the_tiny_preset(tiny_bed, cache_dir, tmp_path):
    from fedke.simulations.scenario import Scenario

    scenario = Scenario.from_preset("tiny", cache_dir=str(cache_dir))
    legacy, legacy_table, legacy_grid, _ = _run_server_app(scenario, tmp_path, "legacy")
    streamed, streamed_table, grid, _ = _run_server_app(replace(scenario, streaming_aggregation=True), tmp_path,
                                                         "streaming")
    # legacy: every message through GridClientProxy; streaming: TRAIN pushed and pulled by the
    # streaming stage, EVALUATE still through the legacy proxy
    assert sorted(set(legacy_grid.blocking_types)) == ["evaluate", "train"]
    assert sorted(set(grid.blocking_types)) == ["evaluate"] and grid.max_alive == 1
    for name in legacy.global_update:  # replies may arrive in another order: float64 rounding of the sums
        np.testing.assert_allclose(streamed.global_update[name], legacy.global_update[name], rtol=1e-10, atol=1e-12)
    quality = ["ES", "PS", "NS", "Score"]

    def rows(table, request_set):
        part = table[(table["request_set"] == request_set) & table["metric"].isin(quality)]
        return part.sort_values(["round", "metric"])[["round", "metric", "value"]].reset_index(drop=True)

    a, b = rows(legacy_table, "all"), rows(streamed_table, "all")  # the oracle's metrics: the same
    assert len(a) == 4 * scenario.num_rounds and a.equals(b), (a, b)
    # the clients' own metrics, averaged in the order the replies came (legacy: a set of futures)
    a, b = rows(legacy_table, "federated"), rows(streamed_table, "federated")
    assert len(a) == 4 * scenario.num_rounds and a[["round", "metric"]].equals(b[["round", "metric"]])
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-12)
    for a, b in zip(legacy.round_metrics, streamed.round_metrics):
        for key in ("n_results", "n_accepted", "n_rejected", "n_failures", "n_edits", "applied", "residual_norm_count"):
            assert a[key] == b[key], key
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-10)
    assert len(streamed.round_metrics) == scenario.num_rounds


# ----------------------------------------------------------------------------- real Flower (slow)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_synthetic_app_streams_through_simulation_and_a_real_deployment(tmp_path, monkeypatch):
    """Flower's own grids: the simulation's in-memory grid (2 clients, the merge of both) and a loopback
    deployment (3 SuperNodes: client 1 raises, client 2 sleeps past the round timeout). The timeout
    leaves the healthy client's fresh ClientApp process (imports of torch, flwr, fedke) time to answer
    on a loaded 2-core machine: at 8 s it sometimes did not."""
    from fedke.simulations.deploy import LoopbackDeployment
    from fedke.simulations.launch import run_app
    from fedke.simulations.synthetic import write_app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shape = {"d-in": 64, "d-out": 16, "layers": 2, "edits": 4}
    specs = synthetic_specs(64, 16, 2)
    expected = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs), max_norm=None, psd_tol=None)
    replies = [(SimpleNamespace(cid=str(p)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        encode_payload(synthetic_payload(specs, 4, seed=1000 + p), send_delta=False)), 4, {})) for p in range(2)]
    _, want = expected.aggregate_fit(1, replies, [])

    app = write_app(tmp_path / "sim", **shape, streaming=True)
    report = tmp_path / "sim.json"
    result = run_app(app, num_supernodes=2, run_config={"report": str(report)}, timeout_s=300, stream=False)
    assert result.ok, result.log_tail()
    got = json.loads(report.read_text())["rounds"][-1]
    assert (got["n_accepted"], got["n_edits"]) == (2, 8)
    assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-9)

    app = write_app(tmp_path / "deploy", **shape, **{"num-clients": 3, "fail-partition": 1, "slow-partition": 2,
                                                     "round-timeout": 20.0, "streaming": True})
    report = tmp_path / "deploy.json"
    with LoopbackDeployment(3, flwr_home=tmp_path / "home") as deployment:
        result = deployment.run(app, run_config={"report": str(report)}, timeout_s=240)
    assert result.ok
    got = json.loads(report.read_text())["rounds"][-1]
    assert (got["n_accepted"], got["n_failures"], got["applied"], got["n_edits"]) == (1, 2, 1.0, 4)
    assert "streaming their replies" in result.log_text and "round 1: client failure" in result.log_text


def test_a_bad_count_metric_is_rejected_in_the_stream_not_raised():
    """Issue 21: ``n_skipped = NaN`` made ``int(...)`` raise out of add_reply and stream_fit (the ServerApp died)."""
    bad = good_res(2)
    bad = FitRes(bad.status, bad.parameters, bad.num_examples, {"n_skipped": float("nan")})
    grid = FakeGrid({1: lambda m: good_res(1), 2: lambda m: bad, 3: lambda m: good_res(3)})
    strategy = collab(n=3)
    _, metrics, _ = servers(strategy, grid, streaming=True).fit_round(1, timeout=None)
    assert metrics["applied"] and metrics["n_accepted"] == 2 and metrics["n_rejected"] == 1
    (cid, why), = strategy.last_rejections
    assert "metrics['n_skipped']" in why, why
    only_good = collab()
    only_good.aggregate_fit(1, [(SimpleNamespace(cid=str(n)), good_res(n)) for n in sorted(grid.reply_order) if n != 2], [])
    for name in only_good.global_update:
        np.testing.assert_allclose(strategy.global_update[name], only_good.global_update[name], rtol=1e-13, atol=1e-15)

"""fedke.strategies: replies built by hand, the Flower methods called directly (no simulation)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedke.codec import LayerSpec, PayloadError, decode_payload, decode_update, encode_payload
from fedke.merge import collab_edit, global_edit, simple_average, task_arithmetic, ties
from fedke.payload import EditPayload, LayerPayload
from fedke.strategies import (
    STRATEGIES,
    TIES,
    CollabEdit,
    EditMergeStrategy,
    FedAvg,
    RoundMerger,
    TaskArithmetic,
    make_strategy,
)

SPECS = [LayerSpec("h.1.mlp.c_proj", 5, 8), LayerSpec("h.2.mlp.c_proj", 7, 9)]
NAMES = [spec.name for spec in SPECS]


# ----------------------------------------------------------------------------- fakes and builders


class FakeProxy(ClientProxy):
    """A ClientProxy that only has a cid (the strategy never calls it)."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_spd(rng: np.random.Generator, n: int) -> np.ndarray:
    samples = rng.standard_normal((n, 4 * n))
    return samples @ samples.T / (4 * n) + 0.5 * np.eye(n)


def make_regularisers(seed: int = 0, lam: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: lam * random_spd(rng, spec.d_in) for spec in SPECS}


class Client:
    """One simulated client: keys K and residuals R per layer, and its MEMIT payload under A0."""

    def __init__(self, rng: np.random.Generator, n_edits: int, regularisers: dict[str, np.ndarray]):
        self.keys = {s.name: rng.standard_normal((s.d_in, n_edits)) for s in SPECS}
        self.residuals = {s.name: 0.3 * rng.standard_normal((s.d_out, n_edits)) for s in SPECS}
        layers = {}
        for s in SPECS:
            k, r = self.keys[s.name], self.residuals[s.name]
            layers[s.name] = LayerPayload(delta=global_edit(r, k, regularisers[s.name]), kkt=k @ k.T, rkt=r @ k.T)
        norms = np.linalg.norm(self.residuals[SPECS[-1].name], axis=0)
        self.payload = EditPayload(layers=layers, n_edits=n_edits, residual_norms=norms)


def make_clients(seed: int, sizes, regularisers) -> list[Client]:
    rng = np.random.default_rng(seed)
    return [Client(rng, m, regularisers) for m in sizes]


def fit_res_of(arrays, num_examples: int = 1, code: Code = Code.OK) -> FitRes:
    return FitRes(status=Status(code, ""), parameters=ndarrays_to_parameters(arrays), num_examples=num_examples, metrics={})


def replies(payloads, first_cid: int = 0, **encode_kwargs):
    return [
        (FakeProxy(str(first_cid + i)), fit_res_of(encode_payload(p, **encode_kwargs), p.n_edits))
        for i, p in enumerate(payloads)
    ]


def decoded(payloads, **encode_kwargs) -> list[EditPayload]:
    """What the server sees after the float32 wire."""
    return [decode_payload(encode_payload(p, **encode_kwargs), expected=SPECS) for p in payloads]


def global_edit_of(clients, regularisers) -> dict[str, np.ndarray]:
    """Global-Edit: MEMIT on all clients' requests at once (concatenated keys and residuals)."""
    return {
        name: global_edit(
            np.concatenate([c.residuals[name] for c in clients], axis=1),
            np.concatenate([c.keys[name] for c in clients], axis=1),
            regularisers[name],
        )
        for name in NAMES
    }


def update_of(parameters: Parameters) -> dict[str, np.ndarray]:
    return decode_update(parameters_to_ndarrays(parameters), expected=SPECS)


def collab(regularisers=None, **kwargs) -> CollabEdit:
    return CollabEdit(layer_specs=SPECS, regularisers=make_regularisers() if regularisers is None else regularisers, **kwargs)


def snapshot(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in arrays.items()}


# ----------------------------------------------------------------------------- CollabEdit


def test_strategies_are_legacy_flower_strategies():
    for cls in STRATEGIES.values():
        assert issubclass(cls, EditMergeStrategy)
        assert issubclass(cls, Strategy)


@pytest.mark.parametrize("use_sums", [True, False])
def test_collabedit_aggregate_fit_equals_global_edit(use_sums):
    regularisers = make_regularisers()
    clients = make_clients(1, (3, 5, 2), regularisers)
    strategy = collab(regularisers, use_sums=use_sums)

    parameters, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])

    expected = global_edit_of(clients, regularisers)
    sent = update_of(parameters)
    for name in NAMES:
        assert rel_err(strategy.global_update[name], expected[name]) < 1e-5
        assert rel_err(sent[name], expected[name]) < 1e-5
        assert strategy.global_update[name].dtype == np.float64
    assert metrics["n_accepted"] == 3 and metrics["n_rejected"] == 0 and metrics["n_failures"] == 0
    assert metrics["n_edits"] == 10 and metrics["applied"] is True
    assert metrics["update_norm"] > 0 and metrics["merge_seconds"] >= 0
    norms = np.concatenate([c.payload.residual_norms for c in clients])
    assert metrics["residual_norm_max"] == pytest.approx(norms.max(), rel=1e-6)
    assert metrics["residual_norm_mean"] == pytest.approx(norms.mean(), rel=1e-6)
    assert metrics["residual_norm_median"] == pytest.approx(np.median(norms), rel=1e-6)
    assert strategy.rounds_merged == 1 and len(strategy.round_metrics) == 1


def test_collabedit_delta_form_is_collab_edit_on_the_decoded_payloads():
    regularisers = make_regularisers()
    clients = make_clients(2, (4, 1, 3), regularisers)
    strategy = collab(regularisers, use_sums=False)
    strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    seen = decoded([c.payload for c in clients])
    for name in NAMES:
        expected = collab_edit([p.layers[name].delta for p in seen], [p.layers[name].kkt for p in seen], regularisers[name])
        assert rel_err(strategy.global_update[name], expected) < 1e-12


def test_collabedit_derives_rkt_from_delta_when_not_sent():
    regularisers = make_regularisers()
    clients = make_clients(3, (2, 6), regularisers)
    strategy = collab(regularisers)
    _, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients], send_rkt=False), [])
    assert metrics["n_accepted"] == 2
    expected = global_edit_of(clients, regularisers)
    for name in NAMES:
        assert rel_err(strategy.global_update[name], expected[name]) < 1e-5


def test_payload_without_delta_accepted_by_sums_form_only():
    regularisers = make_regularisers()
    clients = make_clients(4, (2, 3), regularisers)
    sums = collab(regularisers)
    _, metrics = sums.aggregate_fit(1, replies([c.payload for c in clients], send_delta=False), [])
    assert metrics["n_accepted"] == 2
    expected = global_edit_of(clients, regularisers)
    assert all(rel_err(sums.global_update[n], expected[n]) < 1e-5 for n in NAMES)

    for strategy in (collab(regularisers, use_sums=False), FedAvg(layer_specs=SPECS)):
        _, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients], send_delta=False), [])
        assert metrics["n_accepted"] == 0 and metrics["n_rejected"] == 2
        assert all("delta" in reason and "required" in reason for _, reason in strategy.last_rejections)


# ----------------------------------------------------------------------------- delta merges


@pytest.mark.parametrize(
    "strategy_cls, kwargs, reference",
    [
        (FedAvg, {}, lambda deltas, n: simple_average(deltas, weights=n)),
        (FedAvg, {"weighted": False}, lambda deltas, n: simple_average(deltas)),
        (TaskArithmetic, {}, lambda deltas, n: task_arithmetic(deltas)),
        (TaskArithmetic, {"scale": 0.5}, lambda deltas, n: task_arithmetic(deltas, scale=0.5)),
        (TIES, {}, lambda deltas, n: ties(deltas)),
        (TIES, {"density": 0.5, "scale": 1.5}, lambda deltas, n: ties(deltas, density=0.5, scale=1.5)),
    ],
)
def test_delta_merges_equal_the_merge_functions(strategy_cls, kwargs, reference):
    clients = make_clients(5, (3, 1, 4), make_regularisers())
    strategy = strategy_cls(layer_specs=SPECS, **kwargs)
    _, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    assert metrics["n_accepted"] == 3
    seen = decoded([c.payload for c in clients])
    n_edits = [p.n_edits for p in seen]
    for name in NAMES:
        expected = reference([p.layers[name].delta for p in seen], n_edits)
        np.testing.assert_allclose(strategy.global_update[name], expected, rtol=1e-12, atol=1e-15)


def test_delta_merges_are_destructive_unlike_collabedit():
    """Sanity: averaging deltas is not Global-Edit (the reason CollabEdit exists)."""
    regularisers = make_regularisers()
    clients = make_clients(6, (5, 5, 5), regularisers)
    strategy = FedAvg(layer_specs=SPECS)
    strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    expected = global_edit_of(clients, regularisers)
    assert rel_err(strategy.global_update[NAMES[0]], expected[NAMES[0]]) > 0.1


def test_fedavg_with_all_zero_n_edits_uses_plain_weights():
    clients = make_clients(7, (2, 2), make_regularisers())
    payloads = [EditPayload(c.payload.layers, n_edits=0, residual_norms=c.payload.residual_norms) for c in clients]
    strategy = FedAvg(layer_specs=SPECS)
    _, metrics = strategy.aggregate_fit(1, replies(payloads), [])
    assert metrics["applied"] is True
    seen = decoded(payloads)
    for name in NAMES:
        np.testing.assert_allclose(strategy.global_update[name], simple_average([p.layers[name].delta for p in seen]))


# ----------------------------------------------------------------------------- rounds


@pytest.mark.parametrize("make", [lambda: collab(), lambda: FedAvg(layer_specs=SPECS), lambda: TIES(layer_specs=SPECS)])
def test_two_rounds_accumulate_into_the_global_update(make):
    regularisers = make_regularisers()
    round1 = make_clients(8, (2, 3), regularisers)
    round2 = make_clients(9, (4, 1, 2), regularisers)
    strategy = make()

    strategy.aggregate_fit(1, replies([c.payload for c in round1]), [])
    first = {name: array.copy() for name, array in strategy.global_update.items()}
    merged2 = strategy.merge(decoded([c.payload for c in round2]))
    parameters, metrics = strategy.aggregate_fit(2, replies([c.payload for c in round2]), [])

    sent = update_of(parameters)
    for name in NAMES:
        np.testing.assert_allclose(strategy.global_update[name], first[name] + merged2[name], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(sent[name], strategy.global_update[name], rtol=1e-6, atol=1e-7)
    assert strategy.rounds_merged == 2
    assert [m["server_round"] for m in strategy.round_metrics] == [1, 2]
    expected_norm = np.sqrt(sum(np.sum(merged2[n] ** 2) for n in NAMES))
    assert metrics["update_norm"] == pytest.approx(expected_norm, rel=1e-9)


def test_merge_does_not_change_the_state():
    regularisers = make_regularisers()
    clients = make_clients(10, (2, 2), regularisers)
    strategy = collab(regularisers, dynamic_covariance=(1.0, 1.0))
    before = snapshot(strategy.global_update), snapshot(strategy.kkt_total)
    strategy.merge(decoded([c.payload for c in clients]))
    assert (snapshot(strategy.global_update), snapshot(strategy.kkt_total)) == before
    assert strategy.rounds_merged == 0


def test_memory_stays_flat_over_rounds():
    """No per-round payloads are kept: the arrays held by the strategy do not grow with rounds."""
    regularisers = make_regularisers()

    def held_bytes(obj) -> int:
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if isinstance(obj, dict):
            return sum(held_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(held_bytes(v) for v in obj)
        return 0

    for strategy in (collab(regularisers, dynamic_covariance=(1.0, 0.5)), TIES(layer_specs=SPECS)):
        sizes = []
        for server_round in range(1, 9):
            clients = make_clients(100 + server_round, (2, 3, 1), regularisers)
            strategy.aggregate_fit(server_round, replies([c.payload for c in clients]), [])
            sizes.append(held_bytes(vars(strategy)))
        assert len(set(sizes)) == 1, sizes
        assert len(strategy.round_metrics) == 8


def test_on_round_end_receives_the_metrics():
    calls = []
    clients = make_clients(11, (1, 2), make_regularisers())
    strategy = collab(on_round_end=lambda server_round, metrics: calls.append((server_round, metrics)))
    _, metrics = strategy.aggregate_fit(4, replies([c.payload for c in clients]), [])
    assert calls == [(4, metrics)]


# ----------------------------------------------------------------------------- bad replies


def bad_replies(good_payload: EditPayload) -> dict[str, tuple[FitRes, str]]:
    """cid -> (reply, fragment of the expected rejection reason)."""
    arrays = encode_payload(good_payload)
    nan = [a.copy() for a in arrays]
    nan[1][0, 0] = np.nan
    bad_layer = good_payload.layers[NAMES[0]]
    wrong_shape_layer = LayerPayload(delta=bad_layer.delta[:, :6], kkt=bad_layer.kkt[:6, :6], rkt=bad_layer.rkt[:, :6])
    wrong_shape = EditPayload(layers={NAMES[0]: wrong_shape_layer, NAMES[1]: good_payload.layers[NAMES[1]]}, n_edits=2)
    wrong_set = EditPayload(layers={NAMES[0]: good_payload.layers[NAMES[0]], "h.9.mlp.c_proj": good_payload.layers[NAMES[1]]}, n_edits=2)
    huge = EditPayload(
        layers={
            name: LayerPayload(delta=layer.delta * 1e9, kkt=layer.kkt, rkt=layer.rkt)
            for name, layer in good_payload.layers.items()
        },
        n_edits=2,
    )
    return {
        "nan": (fit_res_of(nan), "non-finite"),
        "wrong-shape": (fit_res_of(encode_payload(wrong_shape)), "shape"),
        "wrong-layers": (fit_res_of(encode_payload(wrong_set)), "layer set"),
        "truncated": (fit_res_of(arrays[:-1]), "truncated"),
        "empty": (FitRes(Status(Code.OK, ""), Parameters(tensors=[], tensor_type="numpy.ndarray"), 1, {}), "empty"),
        "garbage": (FitRes(Status(Code.OK, ""), Parameters(tensors=[b"not numpy"], tensor_type="numpy.ndarray"), 1, {}), "NumPy"),
        "absurd-norm": (fit_res_of(encode_payload(huge)), "absurd norm"),
        "bad-status": (fit_res_of(arrays, code=Code.FIT_NOT_IMPLEMENTED), "status"),
    }


def test_bad_payloads_are_rejected_and_the_rest_merged(caplog):
    regularisers = make_regularisers()
    good = make_clients(13, (3, 2), regularisers)
    bad = bad_replies(good[0].payload)
    results = replies([c.payload for c in good], first_cid=100)
    results[1:1] = [(FakeProxy(cid), res) for cid, (res, _) in bad.items()]
    strategy = collab(regularisers)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = strategy.aggregate_fit(1, results, [])

    reasons = dict(strategy.last_rejections)
    assert set(reasons) == set(bad)
    for cid, (_, fragment) in bad.items():
        assert fragment.lower() in reasons[cid].lower(), (cid, reasons[cid])
        assert any(cid in record.getMessage() and record.levelno == logging.WARNING for record in caplog.records)
    assert metrics["n_accepted"] == 2 and metrics["n_rejected"] == len(bad) and metrics["applied"] is True
    assert metrics["n_edits"] == 5
    expected = global_edit_of(good, regularisers)
    for name in NAMES:
        assert rel_err(strategy.global_update[name], expected[name]) < 1e-5


def test_all_rejected_round_leaves_the_state_unchanged_bit_for_bit():
    regularisers = make_regularisers()
    good = make_clients(14, (2, 3), regularisers)
    strategy = collab(regularisers, dynamic_covariance=(1.0, 1.0))
    strategy.aggregate_fit(1, replies([c.payload for c in good]), [])
    before = snapshot(strategy.global_update), snapshot(strategy.kkt_total)

    bad = bad_replies(good[0].payload)
    failures = [
        TimeoutError("client 7 timed out"),
        (FakeProxy("8"), fit_res_of([], code=Code.FIT_NOT_IMPLEMENTED)),
    ]
    parameters, metrics = strategy.aggregate_fit(2, [(FakeProxy(cid), res) for cid, (res, _) in bad.items()], failures)

    assert (snapshot(strategy.global_update), snapshot(strategy.kkt_total)) == before
    assert metrics["n_accepted"] == 0 and metrics["applied"] is False and metrics["update_norm"] == 0.0
    assert metrics["n_failures"] == 2 and len(strategy.last_failures) == 2
    assert "TimeoutError" in strategy.last_failures[0] and "8" in strategy.last_failures[1]
    assert strategy.rounds_merged == 1
    sent = update_of(parameters)
    for name in NAMES:
        np.testing.assert_allclose(sent[name], strategy.global_update[name], rtol=1e-6, atol=1e-7)


def test_empty_round_with_only_failures_changes_nothing():
    strategy = FedAvg(layer_specs=SPECS)
    before = snapshot(strategy.global_update)
    parameters, metrics = strategy.aggregate_fit(1, [], [RuntimeError("boom")])
    assert snapshot(strategy.global_update) == before
    assert metrics["n_failures"] == 1 and metrics["n_results"] == 0 and metrics["applied"] is False
    assert all(not np.any(a) for a in update_of(parameters).values())


class _Broken(FedAvg):
    """A strategy whose merge misbehaves in a chosen way."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def new_merger(self) -> RoundMerger:
        inner = super().new_merger()
        mode = self.mode

        class Merger(RoundMerger):
            def add(self, payload, weight):
                if mode == "add-raises":
                    raise RuntimeError("bug in add")
                inner.add(payload, weight)

            def result(self):
                merged = inner.result()
                if mode == "nan":
                    merged[NAMES[1]][0, 0] = np.nan
                elif mode == "result-raises":
                    raise np.linalg.LinAlgError("singular")
                elif mode == "wrong-shape":
                    merged[NAMES[0]] = merged[NAMES[0]].T
                return merged

        return Merger()


@pytest.mark.parametrize("mode", ["nan", "result-raises", "add-raises", "wrong-shape"])
def test_a_failing_merge_never_corrupts_the_state(mode, caplog):
    clients = make_clients(15, (2, 2), make_regularisers())
    strategy = _Broken(mode, layer_specs=SPECS)
    strategy.global_update = {name: np.full_like(a, 0.25) for name, a in strategy.global_update.items()}
    before = snapshot(strategy.global_update)
    with caplog.at_level(logging.ERROR, logger="flwr"):
        _, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    assert snapshot(strategy.global_update) == before
    assert metrics["applied"] is False and "error" in metrics
    assert any(record.levelno == logging.ERROR for record in caplog.records)


def test_update_overflowing_the_wire_dtype_is_refused():
    clients = make_clients(16, (2, 2), make_regularisers())
    strategy = TaskArithmetic(layer_specs=SPECS, scale=1e300)
    before = snapshot(strategy.global_update)
    parameters, metrics = strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    assert metrics["applied"] is False and "encoded" in metrics["error"]
    assert snapshot(strategy.global_update) == before
    assert all(not np.any(a) for a in update_of(parameters).values())


# ----------------------------------------------------------------------------- configure_*


def client_manager(n: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for cid in range(n):
        assert manager.register(FakeProxy(str(cid)))
    return manager


def test_configure_fit_sends_only_the_cumulative_update():
    regularisers = make_regularisers()
    strategy = collab(
        regularisers,
        fraction_fit=0.5,
        min_fit_clients=2,
        min_available_clients=2,
        on_fit_config_fn=lambda server_round: {"lam": 2.0, "edits": 3},
    )
    clients = make_clients(17, (2, 3), regularisers)
    strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    bogus = ndarrays_to_parameters([np.ones(3)])  # the server's copy is ignored

    instructions = strategy.configure_fit(2, bogus, client_manager(6))

    assert len(instructions) == 3  # max(min_fit_clients, int(0.5 * 6))
    assert len({proxy.cid for proxy, _ in instructions}) == 3
    for proxy, fit_ins in instructions:
        assert isinstance(proxy, FakeProxy) and isinstance(fit_ins, FitIns)
        assert fit_ins.config == {"server_round": 2, "lam": 2.0, "edits": 3}
        arrays = parameters_to_ndarrays(fit_ins.parameters)
        assert len(arrays) == 1 + len(SPECS)  # manifest + one update per edited layer, nothing else
        sent = decode_update(arrays, expected=SPECS)
        for name in NAMES:
            np.testing.assert_allclose(sent[name], strategy.global_update[name], rtol=1e-6, atol=1e-7)
        with pytest.raises(PayloadError):
            decode_payload(arrays)

    assert len(strategy.configure_fit(3, bogus, client_manager(2))) == 2
    strategy.fraction_fit = 1.0
    assert len(strategy.configure_fit(3, bogus, client_manager(5))) == 5


def test_initialize_parameters_is_the_initial_update():
    initial = {spec.name: np.full((spec.d_out, spec.d_in), 0.5) for spec in SPECS}
    strategy = FedAvg(layer_specs=SPECS, initial_update=initial)
    sent = update_of(strategy.initialize_parameters(client_manager(2)))
    assert all(np.array_equal(sent[name], initial[name]) for name in NAMES)
    zeros = update_of(collab().initialize_parameters(client_manager(2)))
    assert all(not np.any(a) for a in zeros.values())


def test_configure_evaluate_sends_the_update_with_server_round():
    strategy = FedAvg(
        layer_specs=SPECS, min_evaluate_clients=3, min_available_clients=3,
        on_evaluate_config_fn=lambda server_round: {"split": "test"},
    )
    instructions = strategy.configure_evaluate(5, None, client_manager(4))
    assert len(instructions) == 4
    for _, evaluate_ins in instructions:
        assert evaluate_ins.config == {"server_round": 5, "split": "test"}
        decode_update(parameters_to_ndarrays(evaluate_ins.parameters), expected=SPECS)
    strategy.fraction_evaluate = 0.0
    assert strategy.configure_evaluate(5, None, client_manager(4)) == []


# ----------------------------------------------------------------------------- evaluation


def evaluate_res(loss, n, metrics, code=Code.OK) -> EvaluateRes:
    return EvaluateRes(status=Status(code, ""), loss=loss, num_examples=n, metrics=metrics)


def test_aggregate_evaluate_weights_by_num_examples():
    strategy = FedAvg(layer_specs=SPECS)
    results = [
        (FakeProxy("0"), evaluate_res(1.0, 1, {"es": 1.0, "ps": 0.5, "tag": "a", "flag": True})),
        (FakeProxy("1"), evaluate_res(2.0, 1, {"es": 0.0, "ps": 1.0, "count": 4})),
        (FakeProxy("2"), evaluate_res(4.0, 2, {"es": 0.5})),
        (FakeProxy("3"), evaluate_res(9.0, 5, {"es": 9.0}, code=Code.EVALUATE_NOT_IMPLEMENTED)),
    ]
    loss, metrics = strategy.aggregate_evaluate(1, results, [TimeoutError("late")])
    assert loss == pytest.approx((1.0 + 2.0 + 8.0) / 4)
    assert metrics["es"] == pytest.approx((1.0 + 0.0 + 1.0) / 4)
    assert metrics["ps"] == pytest.approx(0.75)  # only the clients that reported it
    assert metrics["count"] == pytest.approx(4.0)
    assert "tag" not in metrics and "flag" not in metrics
    assert metrics["n_results"] == 3 and metrics["n_failures"] == 2 and metrics["num_examples"] == 4

    loss, metrics = strategy.aggregate_evaluate(1, [], [RuntimeError("x")])
    assert loss is None and metrics["n_failures"] == 1


def test_evaluate_calls_the_oracle_with_the_cumulative_update():
    calls = []

    def oracle(server_round, update):
        calls.append((server_round, update))
        return 0.5, {"es": 1.0}

    clients = make_clients(18, (2, 2), make_regularisers())
    strategy = collab(evaluate_fn=oracle)
    strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    assert strategy.evaluate(1, None) == (0.5, {"es": 1.0})
    server_round, update = calls[0]
    assert server_round == 1 and set(update) == set(NAMES)
    assert all(np.array_equal(update[name], strategy.global_update[name]) for name in NAMES)
    with pytest.raises(ValueError):
        update[NAMES[0]][0, 0] = 1.0  # read-only: the oracle cannot corrupt the state

    assert collab().evaluate(1, None) is None
    assert collab(evaluate_fn=lambda r, u: None).evaluate(1, None) is None


# ----------------------------------------------------------------------------- dynamic covariance


def test_dynamic_covariance_regulariser_and_closed_form():
    beta0, beta1 = 0.5, 2.0
    regularisers = make_regularisers()
    round1 = make_clients(19, (3, 2), regularisers)
    round2 = make_clients(20, (1, 4, 2), regularisers)
    strategy = collab(regularisers, dynamic_covariance=(beta0, beta1))
    delta_form = collab(regularisers, dynamic_covariance=(beta0, beta1), use_sums=False)

    first = strategy.regulariser_for_round()
    assert all(np.array_equal(first[n], beta0 * regularisers[n]) for n in NAMES)
    for s in (strategy, delta_form):
        s.aggregate_fit(1, replies([c.payload for c in round1]), [])

    seen1 = decoded([c.payload for c in round1])
    kkt_round1 = {n: sum(p.layers[n].kkt for p in seen1) for n in NAMES}
    second = strategy.regulariser_for_round()
    for n in NAMES:
        np.testing.assert_allclose(strategy.kkt_total[n], kkt_round1[n], rtol=1e-12)
        np.testing.assert_allclose(second[n], beta0 * regularisers[n] + beta1 * kkt_round1[n], rtol=1e-12)

    before = {n: a.copy() for n, a in strategy.global_update.items()}
    strategy.aggregate_fit(2, replies([c.payload for c in round2]), [])
    delta_form.aggregate_fit(2, replies([c.payload for c in round2]), [])

    seen2 = decoded([c.payload for c in round2])
    for n in NAMES:
        # by hand from the decoded sums: Delta_2 = S_2 (beta0 A0 + beta1 G_1 + G_2)^-1
        s2 = sum(p.layers[n].rkt for p in seen2)
        g2 = sum(p.layers[n].kkt for p in seen2)
        gram = beta0 * regularisers[n] + beta1 * kkt_round1[n] + g2
        by_hand = np.linalg.solve(gram, s2.T).T
        merged = strategy.global_update[n] - before[n]
        assert rel_err(merged, by_hand) < 1e-10
        # and from the true keys and residuals (Global-Edit with C_t)
        keys = np.concatenate([c.keys[n] for c in round2], axis=1)
        residuals = np.concatenate([c.residuals[n] for c in round2], axis=1)
        truth = global_edit(residuals, keys, beta0 * regularisers[n] + beta1 * sum(c.keys[n] @ c.keys[n].T for c in round1))
        assert rel_err(merged, truth) < 1e-5
        # the delta form reconstructs R K^T with the clients' A0 and agrees
        assert rel_err(delta_form.global_update[n], strategy.global_update[n]) < 1e-5
        np.testing.assert_allclose(strategy.kkt_total[n], kkt_round1[n] + g2, rtol=1e-12)


def test_kkt_total_is_not_updated_by_a_round_that_is_not_applied():
    regularisers = make_regularisers()
    clients = make_clients(21, (2, 2), regularisers)
    strategy = collab(regularisers, dynamic_covariance=(1.0, 1.0), wire_dtype=np.float16, max_norm=None)
    huge = [
        EditPayload({n: LayerPayload(l.delta, l.kkt, l.rkt * 1e7) for n, l in c.payload.layers.items()}, c.payload.n_edits)
        for c in clients
    ]
    _, metrics = strategy.aggregate_fit(1, replies(huge), [])  # overflows float16 on the way out
    assert metrics["applied"] is False and "encoded" in metrics["error"]
    assert all(not np.any(k) for k in strategy.kkt_total.values())


# ----------------------------------------------------------------------------- checkpointing


def test_state_dict_round_trip():
    regularisers = make_regularisers()
    strategy = collab(regularisers, dynamic_covariance=(1.0, 0.5))
    for server_round in (1, 2):
        clients = make_clients(30 + server_round, (2, 3), regularisers)
        strategy.aggregate_fit(server_round, replies([c.payload for c in clients]), [])

    state = strategy.state_dict()
    meta = json.loads(json.dumps(state["meta"]))  # JSON-able
    buffer = io.BytesIO()
    np.savez(buffer, **state["arrays"])  # plain arrays: no pickle needed
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert set(arrays) == {f"{g}/{n}" for g in ("global_update", "kkt_total") for n in NAMES}

    restored = collab(regularisers, dynamic_covariance=(1.0, 0.5))
    restored.load_state_dict({"arrays": arrays, "meta": meta})
    assert snapshot(restored.global_update) == snapshot(strategy.global_update)
    assert snapshot(restored.kkt_total) == snapshot(strategy.kkt_total)
    assert restored.rounds_merged == 2 and restored.round_metrics == json.loads(json.dumps(strategy.round_metrics))

    clients = make_clients(40, (1, 2), regularisers)
    strategy.aggregate_fit(3, replies([c.payload for c in clients]), [])
    restored.aggregate_fit(3, replies([c.payload for c in clients]), [])
    assert snapshot(restored.global_update) == snapshot(strategy.global_update)

    # the state is a copy, not a view
    state["arrays"][f"global_update/{NAMES[0]}"][:] = 7.0
    assert not np.any(strategy.global_update[NAMES[0]] == 7.0)


def test_load_state_dict_refuses_a_state_that_does_not_fit():
    regularisers = make_regularisers()
    strategy = collab(regularisers)
    clients = make_clients(41, (2, 2), regularisers)
    strategy.aggregate_fit(1, replies([c.payload for c in clients]), [])
    state = strategy.state_dict()

    with pytest.raises(ValueError, match="CollabEdit"):
        FedAvg(layer_specs=SPECS).load_state_dict(state)
    with pytest.raises(ValueError, match="layer specs"):
        CollabEdit(layer_specs=SPECS[:1], regularisers={NAMES[0]: regularisers[NAMES[0]]}).load_state_dict(state)

    fresh = collab(regularisers)
    before = snapshot(fresh.global_update)
    corrupt = {"arrays": dict(state["arrays"]), "meta": state["meta"]}
    corrupt["arrays"][f"kkt_total/{NAMES[1]}"] = np.full((9, 9), np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        fresh.load_state_dict(corrupt)
    assert snapshot(fresh.global_update) == before and fresh.rounds_merged == 0

    fedavg = FedAvg(layer_specs=SPECS)
    fedavg.load_state_dict(FedAvg(layer_specs=SPECS).state_dict())


# ----------------------------------------------------------------------------- construction


def test_make_strategy_by_name():
    regularisers = make_regularisers()
    assert set(STRATEGIES) == {"collabedit", "fedavg", "task_arithmetic", "ties", "layerwise_collabedit"}
    assert isinstance(make_strategy("collabedit", layer_specs=SPECS, regularisers=regularisers), CollabEdit)
    assert isinstance(make_strategy("CollabEdit", layer_specs=SPECS, regularisers=regularisers), CollabEdit)
    assert isinstance(make_strategy("task-arithmetic", layer_specs=SPECS, scale=0.5), TaskArithmetic)
    assert isinstance(make_strategy("TIES", layer_specs=SPECS), TIES)
    fedavg = make_strategy("fedavg", layer_specs=SPECS, weighted=False)
    assert isinstance(fedavg, FedAvg) and fedavg.weighted is False
    with pytest.raises(ValueError) as info:
        make_strategy("fedprox", layer_specs=SPECS)
    for name in STRATEGIES:
        assert name in str(info.value)


def test_constructor_validation():
    regularisers = make_regularisers()
    with pytest.raises(ValueError, match="layer set"):
        CollabEdit(layer_specs=SPECS, regularisers={NAMES[0]: regularisers[NAMES[0]]})
    with pytest.raises(ValueError, match="shape"):
        CollabEdit(layer_specs=SPECS, regularisers={**regularisers, NAMES[1]: np.eye(8)})
    with pytest.raises(ValueError, match="symmetric"):
        CollabEdit(layer_specs=SPECS, regularisers={**regularisers, NAMES[1]: np.triu(np.ones((9, 9)))})
    with pytest.raises(ValueError, match="beta0"):
        collab(dynamic_covariance=(0.0, 1.0))
    with pytest.raises(ValueError, match="initial_update"):
        FedAvg(layer_specs=SPECS, initial_update={NAMES[0]: np.zeros((5, 8))})
    with pytest.raises(ValueError, match="density"):
        TIES(layer_specs=SPECS, density=0.0)
    with pytest.raises(ValueError, match="wire_dtype"):
        FedAvg(layer_specs=SPECS, wire_dtype=np.int32)
    with pytest.raises(ValueError, match="twice"):
        FedAvg(layer_specs=[SPECS[0], SPECS[0]])
    with pytest.raises(TypeError):
        FedAvg(layer_specs=SPECS, regularisers=regularisers)


def test_repr_names_the_strategy_and_its_settings():
    text = repr(TIES(layer_specs=SPECS, density=0.3))
    assert text.startswith("TIES(") and "density=0.3" in text and "layers=2" in text
    assert "dynamic_covariance=[1.0, 2.0]" in repr(collab(dynamic_covariance=(1.0, 2.0)))

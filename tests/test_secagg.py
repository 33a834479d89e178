"""CollabEdit under secure aggregation (fedke.strategies.secagg): maths by hand, the world, a real SecAgg+ run."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

from fedke.codec import LayerSpec, PayloadError
from fedke.merge import global_edit
from fedke.payload import EditPayload, LayerPayload
from fedke.strategies import CollabEdit, CollabEditSecAgg, SecAggBounds
from fedke.strategies.secagg import (
    split_limbs,
    decode_secagg_sum,
    default_bounds,
    encode_secagg,
    quantization_range_for,
    secagg_layout,
    simulate_secagg_mean,
)

REPO = Path(__file__).resolve().parents[1]
SPECS = [LayerSpec("a", 5, 8), LayerSpec("b", 7, 9)]


class Proxy:
    def __init__(self, cid: str):
        self.cid = cid


def _spd(rng, n):
    x = rng.standard_normal((n, 4 * n))
    return x @ x.T / (4 * n) + 0.5 * np.eye(n)


def _setup(seed=0, n_clients=5, n_edits=3):
    rng = np.random.default_rng(seed)
    regs = {s.name: 2.0 * _spd(rng, s.d_in) for s in SPECS}
    payloads, keys, residuals = [], [], []
    for _ in range(n_clients):
        layers = {}
        k_c, r_c = {}, {}
        for s in SPECS:
            k = rng.standard_normal((s.d_in, n_edits))
            r = 0.3 * rng.standard_normal((s.d_out, n_edits))
            k_c[s.name], r_c[s.name] = k, r
            layers[s.name] = LayerPayload(delta=global_edit(r, k, regs[s.name]), kkt=k @ k.T, rkt=r @ k.T)
        payloads.append(EditPayload(layers=layers, n_edits=n_edits, residual_norms=np.ones(n_edits)))
        keys.append(k_c)
        residuals.append(r_c)
    return regs, payloads


def _bounds(payloads, headroom=2.0):
    kkt = max(float(np.abs(p.layers[s.name].kkt).max()) for p in payloads for s in SPECS)
    rkt = max(float(np.abs(p.layers[s.name].rkt).max()) for p in payloads for s in SPECS)
    return SecAggBounds(kkt=headroom * kkt, rkt=headroom * rkt, stats=8.0)


def _results(strategy, payloads, *, exact=False):
    arrays = [encode_secagg(p, SPECS, strategy.bounds) for p in payloads]
    if exact:  # the mean without quantisation
        mean = [sum(a[i] for a in arrays) / len(arrays) for i in range(len(arrays[0]))]
    else:
        mean = simulate_secagg_mean(arrays, clip=strategy.bounds.clip, quantization_range=strategy.quantization_range)
    parameters = ndarrays_to_parameters(mean)
    return [(Proxy(str(i)), FitRes(Status(Code.OK, ""), parameters, 1, {})) for i in range(len(payloads))]


def _secagg(regs, payloads, **kwargs):
    kwargs.setdefault("limbs", 1)
    return CollabEditSecAgg(layer_specs=SPECS, regularisers=regs, bounds=_bounds(payloads),
                            max_clients=len(payloads), **kwargs)


def _plain(regs, payloads):
    from fedke.codec import encode_payload

    plain = CollabEdit(layer_specs=SPECS, regularisers=regs, max_norm=None)
    replies = [(Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encode_payload(p, dtype=np.float64)),
                                      p.n_edits, {})) for i, p in enumerate(payloads)]
    plain.aggregate_fit(1, replies, [])
    return plain


def _rel(a, b):
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    return math.sqrt(num / sum(float(np.sum(b[k] ** 2)) for k in b))


# ----------------------------------------------------------------------------- the arithmetic


def test_quantization_range_keeps_the_modular_sum_from_wrapping():
    for n in (1, 2, 3, 5, 7, 8, 16, 100, 1000):
        t = quantization_range_for(n)
        assert n * t < 2**32 and 2 * n * t >= 2**32 or t == 2**30
        assert t & (t - 1) == 0 and t <= 2**30
    assert quantization_range_for(5) == 2**29
    with pytest.raises(ValueError):
        quantization_range_for(0)


def test_layout_and_exact_round_trip_of_the_sums():
    regs, payloads = _setup()
    bounds = _bounds(payloads)
    assert [kind for _, kind, _ in secagg_layout(SPECS)] == ["stats", "rkt", "kkt", "rkt", "kkt"]
    arrays = [encode_secagg(p, SPECS, bounds) for p in payloads]
    assert all(float(np.abs(a).max()) <= bounds.clip for client in arrays for a in client)
    mean = [sum(a[i] for a in arrays) / len(arrays) for i in range(len(arrays[0]))]
    summed, count = decode_secagg_sum(mean, len(payloads), SPECS, bounds)
    assert count == pytest.approx(1.0, abs=1e-12) and summed.n_edits == 15
    for s in SPECS:
        np.testing.assert_allclose(summed.layers[s.name].kkt, sum(p.layers[s.name].kkt for p in payloads), atol=1e-12)
        np.testing.assert_allclose(summed.layers[s.name].rkt, sum(p.layers[s.name].rkt for p in payloads), atol=1e-12)


def test_flower_quantisation_error_is_a_few_steps():
    rng = np.random.default_rng(1)
    clients = [[rng.uniform(-8, 8, size=(50, 40))] for _ in range(4)]
    t = quantization_range_for(4)
    mean = simulate_secagg_mean(clients, clip=8.0, quantization_range=t)[0]
    exact = sum(c[0] for c in clients) / 4
    step = 16.0 / t
    assert float(np.abs(mean - exact).max()) <= step  # each client is off by < 1 step; the mean by < 1 step
    assert float(np.abs(mean - exact).max()) > 0  # stochastic rounding did something


def test_a_client_refuses_values_beyond_the_public_bound():
    _, payloads = _setup()
    tight = SecAggBounds(kkt=1e-3, rkt=1e9, stats=8.0)
    with pytest.raises(PayloadError, match=r"kkt.*exceeds the secure-aggregation bound.*secagg-kkt-bound"):
        encode_secagg(payloads[0], SPECS, tight)
    with pytest.raises(PayloadError, match="stats"):
        encode_secagg(payloads[0], SPECS, SecAggBounds(kkt=1e9, rkt=1e9, stats=1.0))
    with pytest.raises(PayloadError, match="lacks"):
        SecAggBounds.from_config({"secagg-kkt-bound": 1.0})
    with pytest.raises(ValueError):
        SecAggBounds(kkt=-1.0, rkt=1.0, stats=1.0)


def test_two_limbs_put_the_high_limb_on_the_grid_and_lose_almost_nothing():
    rng = np.random.default_rng(4)
    t = quantization_range_for(5)
    values = rng.uniform(-8, 8, size=(30, 20))
    hi, lo = split_limbs(values, 8.0, t)
    assert np.abs(hi).max() <= 8 and np.abs(lo).max() <= 8
    grid = (hi + 8.0) * (t / 16.0)
    np.testing.assert_array_equal(grid, np.round(grid))  # exactly on SecAgg+'s grid
    np.testing.assert_allclose(hi + lo / t, values, rtol=0, atol=1e-14)
    clients = [[rng.uniform(-8, 8, size=(40, 30))] for _ in range(5)]
    exact = sum(c[0] for c in clients) / 5
    one = simulate_secagg_mean(clients, clip=8.0, quantization_range=t)[0]
    limbed = simulate_secagg_mean([list(split_limbs(c[0], 8.0, t)) for c in clients], clip=8.0, quantization_range=t)
    two = limbed[0] + limbed[1] / t
    assert np.abs(two - exact).max() < 1e-6 * np.abs(one - exact).max()


# ----------------------------------------------------------------------------- the strategy


def test_secagg_merge_equals_collabedit_and_never_sees_a_client():
    regs, payloads = _setup()
    plain = _plain(regs, payloads)
    secure = _secagg(regs, payloads)
    results = _results(secure, payloads, exact=True)
    assert len({id(res.parameters) for _, res in results}) == 1  # one aggregate, no per-client array
    _, metrics = secure.aggregate_fit(1, results, [])
    assert metrics["applied"] and metrics["n_accepted"] == 5 and metrics["n_edits"] == 15
    assert _rel(secure.global_update, plain.global_update) < 1e-10
    for s in SPECS:  # the dynamic-covariance state holds the SUM of K K^T only
        np.testing.assert_allclose(secure.kkt_total[s.name], plain.kkt_total[s.name], rtol=1e-10, atol=1e-12)

    errors = {}
    for limbs in (1, 2):
        quantised = _secagg(regs, payloads, limbs=limbs)
        _, metrics = quantised.aggregate_fit(1, _results(quantised, payloads), [])
        assert metrics["applied"]
        errors[limbs] = _rel(quantised.global_update, plain.global_update)
    assert 0 < errors[1] < 1e-6 and errors[2] < 1e-4 * errors[1], errors


def test_a_secure_round_uses_its_own_checks_and_reports_once_leaving_the_strategy_as_it_was():
    """The sum's wider PSD tolerance and lifted per-client edit bound are the round's checks
    (``begin_round(checks=...)``), not a temporary change of the strategy's attributes, and
    ``on_round_end`` hears the secure round once, with its secure metrics."""
    regs, payloads = _setup()
    heard = []
    secure = _secagg(regs, payloads, max_edits_per_client=3, on_round_end=lambda r, m: heard.append((r, m)))
    settings = (secure.psd_tol, secure.max_edits_per_client, secure.on_round_end)
    _, metrics = secure.aggregate_fit(1, _results(secure, payloads), [])
    assert metrics["applied"] and metrics["n_edits"] == 15  # 5 x 3 edits: above one client's bound of 3
    assert (secure.psd_tol, secure.max_edits_per_client, secure.on_round_end) == settings
    assert [(r, m["secure_aggregation"], m["n_accepted"]) for r, m in heard] == [(1, True, 5)]


def test_configure_fit_sends_the_public_bounds_and_caps_the_clients():
    from flwr.server.client_proxy import ClientProxy

    class FakeProxy(ClientProxy):
        def get_properties(self, ins, timeout, group_id): raise NotImplementedError
        def get_parameters(self, ins, timeout, group_id): raise NotImplementedError
        def fit(self, ins, timeout, group_id): raise NotImplementedError
        def evaluate(self, ins, timeout, group_id): raise NotImplementedError
        def reconnect(self, ins, timeout, group_id): raise NotImplementedError

    regs, payloads = _setup(n_clients=3)
    secure = _secagg(regs, payloads)  # max_clients = 3
    manager = SimpleClientManager()
    for i in range(4):
        manager.register(FakeProxy(str(i)))
    instructions = secure.configure_fit(1, Parameters([], ""), manager)
    assert len(instructions) == 3
    for _, ins in instructions:
        assert ins.config["server_round"] == 1
        assert SecAggBounds.from_config(ins.config) == secure.bounds
    workflow = secure.workflow()
    assert (workflow.max_weight, workflow.clipping_range, workflow.quantization_range) == (1.0, 8.0, 2**30)
    assert secure.bounds.quantization_range == 2**30


@pytest.mark.parametrize("problem", ["weights", "layout", "count", "too_many"])
def test_an_aggregate_that_cannot_be_trusted_changes_nothing(problem, caplog):
    regs, payloads = _setup()
    secure = _secagg(regs, payloads)
    results = _results(secure, payloads, exact=True)
    if problem == "weights":
        results[2] = (results[2][0], FitRes(Status(Code.OK, ""), results[2][1].parameters, 7, {}))
    elif problem == "layout":
        from flwr.common import parameters_to_ndarrays

        arrays = parameters_to_ndarrays(results[0][1].parameters)[:-1]
        results = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})) for p, _ in results]
    elif problem == "count":
        from flwr.common import parameters_to_ndarrays

        arrays = parameters_to_ndarrays(results[0][1].parameters)
        arrays[0] = arrays[0] * 2.0  # a weighting that did not cancel: the count slot reads 2 per client
        results = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})) for p, _ in results]
    else:
        results = results + [(Proxy("x"), results[0][1])]
    before = {k: v.copy() for k, v in secure.global_update.items()}
    _, metrics = secure.aggregate_fit(1, results, [])
    assert not metrics["applied"] and "error" in metrics
    assert all(np.array_equal(before[k], secure.global_update[k]) for k in before)
    assert secure.rounds_merged == 0
    assert "secure aggregate refused" in caplog.text


def test_default_bounds_follow_the_derivation():
    rng = np.random.default_rng(3)
    cov = {s.name: _spd(rng, s.d_in) for s in SPECS}
    weights = {s.name: rng.standard_normal((s.d_out, s.d_in)) for s in SPECS}
    bounds = default_bounds({k: 10.0 * v for k, v in cov.items()}, weights, lam=10.0, max_edits=4)
    kkt = max(4 * np.trace(c) for c in cov.values())
    rkt = max(4 * math.sqrt(np.trace(cov[k]) * np.trace(weights[k] @ cov[k] @ weights[k].T)) for k in cov)
    assert bounds.kkt == pytest.approx(kkt) and bounds.rkt == pytest.approx(rkt) and bounds.stats == 4.0


def test_scenario_refuses_secure_aggregation_without_collabedit():
    from fedke.simulations.scenario import Scenario

    with pytest.raises(ValueError, match="secure-aggregation"):
        Scenario(model="world", strategy="fedavg", secure_aggregation=True)
    with pytest.raises(ValueError, match="secure-aggregation"):
        Scenario(model="world", num_clients=1, secure_aggregation=True)


# ----------------------------------------------------------------------------- the world


def test_world_secagg_matches_plain_collabedit(tiny_bed, cache_dir):
    """5 clients on the tiny world: merged update within 1e-3 (relative Frobenius), Score within 0.5."""
    from fedke.simulations.scenario import Scenario
    from fedke.simulations.secure import compare_secagg

    scenario = Scenario.from_preset("tiny", num_rounds=1, num_clients=5, cache_dir=str(cache_dir))
    result = compare_secagg(scenario)
    assert result.rel_error < 1e-9, result.rel_error  # two limbs: float64 rounding
    assert abs(result.score_plain - result.score_secagg) <= 0.5
    assert result.strategy.last_count_check == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_flwr_run_with_real_secaggplus_equals_plain_collabedit(tiny_bed, cache_dir, tmp_path, monkeypatch):
    """The real protocol (SecAggPlusWorkflow + secaggplus_mod) under ``flwr run``, 3 nodes x 2 rounds."""
    import pandas as pd

    from fedke.simulations.inprocess import run_in_process
    from fedke.simulations.flwr_cli import load_run_config
    from fedke.simulations.launch import run_app
    from fedke.simulations.processes import processes_with_flwr_home
    from fedke.simulations.scenario import Scenario

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = {**load_run_config(REPO / "simulations" / "presets" / "tiny.toml"), "cache-dir": str(cache_dir),
              "output-dir": str(tmp_path / "out"), "secure-aggregation": True}
    home = (tmp_path / "home").resolve()
    try:
        result = run_app(REPO, num_supernodes=3, run_config=config, flwr_home=home, timeout_s=400, stream=False)
    finally:
        assert processes_with_flwr_home(home) == set()
    assert result.ok
    assert result.log_text.count("Secure aggregation completed") == 2
    table = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False)
    plain = run_in_process(Scenario.from_run_config({**config, "secure-aggregation": False}), write=False).writer.table()

    def value(t, r, metric, request_set="all"):
        rows = t[(t["round"] == r) & (t["metric"] == metric) & (t["request_set"] == request_set)]
        return float(rows["value"].iloc[0])

    for r in (1, 2):
        assert value(table, r, "n_accepted", "merge") == 3
        assert abs(value(table, r, "Score") - value(plain, r, "Score")) <= 0.5
        assert value(table, r, "update_norm", "merge") == pytest.approx(value(plain, r, "update_norm", "merge"), rel=1e-4)

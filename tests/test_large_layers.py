"""Large layers: bytes on the wire, float16 transport, server memory independent of N, and the
synthetic app (GPT-2 XL-shaped layers, scaled down here) through simulation and a loopback deployment."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedke.codec import decode_payload, encode_payload, payload_nbytes
from fedke.strategies import CollabEdit
from fedke.simulations.synthetic import XL_SPECS, synthetic_payload, synthetic_regularisers, synthetic_specs

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


class Proxy:
    def __init__(self, cid):
        self.cid = cid


def _replies(specs, n, dtype="float32", edits=8):
    out = []
    for i in range(n):
        arrays = encode_payload(synthetic_payload(specs, edits, seed=i), dtype=dtype, send_delta=False)
        out.append((Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), edits, {})))
    return out


def test_xl_shapes_and_bytes_per_client_round():
    assert [(s.d_out, s.d_in) for s in XL_SPECS] == [(1600, 6400)] * 5
    assert XL_SPECS[0].name == "transformer.h.13.mlp.c_proj"
    specs = synthetic_specs(d_in=96, d_out=24, layers=3)
    payload = synthetic_payload(specs, 5, seed=0, with_delta=True)
    for dtype, size in (("float32", 4), ("float16", 2)):
        full = encode_payload(payload, dtype=dtype)
        sums = encode_payload(payload, dtype=dtype, send_delta=False)
        per_layer_full = size * (2 * 24 * 96 + 96 * 97 // 2)
        body = payload_nbytes(full) - full[0].nbytes - full[-1].nbytes
        assert body == 3 * per_layer_full  # delta + rkt + K K^T packed (upper triangle only)
        sums_body = payload_nbytes(sums) - sums[0].nbytes - sums[-1].nbytes  # without manifest and norms
        assert body - sums_body == 3 * size * 24 * 96
    # GPT-2 XL, 5 layers, float32, sums form: (1600 x 6400 + 6400 x 6401 / 2) x 4 bytes per layer
    xl_bytes = sum(4 * (s.d_out * s.d_in + s.d_in * (s.d_in + 1) // 2) for s in XL_SPECS)
    assert xl_bytes == 614_464_000  # 586 MiB per client and round


def test_float16_transport_error_is_small():
    specs = synthetic_specs(d_in=200, d_out=50, layers=2)
    payload = synthetic_payload(specs, 16, seed=1)
    half = decode_payload(encode_payload(payload, dtype="float16", send_delta=False))
    for name, layer in payload.layers.items():
        for array in ("kkt", "rkt"):
            exact = getattr(layer, array)
            error = np.linalg.norm(getattr(half.layers[name], array) - exact) / np.linalg.norm(exact)
            assert 0 < error < 1e-3, (name, array, error)


def _aggregate_peak(specs, n):
    strategy = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs), max_norm=None, psd_tol=None)
    replies = _replies(specs, n)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        _, metrics = strategy.aggregate_fit(1, replies, [])
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert metrics["applied"] and metrics["n_accepted"] == n
    return peak


def test_server_memory_is_independent_of_the_number_of_clients():
    """The strategy decodes and accumulates one reply at a time: its peak does not grow with N."""
    specs = synthetic_specs(d_in=300, d_out=75, layers=3)
    small, large = _aggregate_peak(specs, 2), _aggregate_peak(specs, 8)
    gram_bytes = sum(8 * s.d_in * s.d_in for s in specs)
    assert large <= 1.1 * small, (small, large)
    assert small < 8 * gram_bytes  # a few (d_in x d_in) float64 per layer, not one per client


@pytest.mark.slow
@needs_proc
def test_synthetic_large_layers_through_simulation_and_deployment(tmp_path, monkeypatch):
    from fedke.simulations.deploy import LoopbackDeployment
    from fedke.simulations.launch import run_app
    from fedke.simulations.synthetic import write_app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shape = {"d-in": 640, "d-out": 160, "layers": 2, "edits": 8}
    app = write_app(tmp_path / "app", **shape)
    specs = synthetic_specs(640, 160, 2)
    expected = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs), max_norm=None, psd_tol=None)
    replies = []
    for partition in range(2):
        arrays = encode_payload(synthetic_payload(specs, 8, seed=1000 + partition), send_delta=False)
        replies.append((Proxy(str(partition)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 8, {})))
    _, want = expected.aggregate_fit(1, replies, [])

    report = tmp_path / "sim.json"
    assert run_app(app, num_supernodes=2, run_config={"report": str(report)}, timeout_s=300, stream=False).ok
    with LoopbackDeployment(2, flwr_home=tmp_path / "home") as deployment:
        assert deployment.run(app, run_config={"report": str(tmp_path / "deploy.json")}, timeout_s=300).ok
    for path in (report, tmp_path / "deploy.json"):
        got = json.loads(path.read_text())["rounds"][-1]
        assert got["n_accepted"] == 2 and got["n_edits"] == 16
        assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-9)

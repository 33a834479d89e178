"""Payloads that cannot hurt the server: a corpus of bad replies through a strategy's aggregate_fit.

Every bad reply arrives next to two good ones, as real Flower bytes (``Parameters``). Each is
rejected with a logged reason naming what is wrong, the round goes on with the good clients (the
merge equals merging them alone), and the global model is never corrupted. A round where every
reply is bad changes nothing, bit for bit. Nothing is ever unpickled: not on the wire, not in
checkpoints or caches.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters

from fedke.badpayloads import bad_payload_corpus, fit_res
from fedke.codec import LayerSpec, encode_payload
from fedke.merge import global_edit
from fedke.payload import EditPayload, LayerPayload
from fedke.strategies import CollabEdit, FedAvg

REPO = Path(__file__).resolve().parents[1]
SPECS = [LayerSpec("h.1.mlp.c_proj", 5, 8), LayerSpec("h.2.mlp.c_proj", 7, 9)]
MAX_NORM = 1e4  # the configurable bound of "absurd norm"


class Proxy:
    def __init__(self, cid: str):
        self.cid = cid


def _spd(rng, n):
    x = rng.standard_normal((n, 4 * n))
    return x @ x.T / (4 * n) + 0.5 * np.eye(n)


REGS = {s.name: 2.0 * _spd(np.random.default_rng(0), s.d_in) for s in SPECS}


def good_payload(seed: int, n_edits: int = 3) -> EditPayload:
    rng = np.random.default_rng(100 + seed)
    layers = {}
    for s in SPECS:
        k = rng.standard_normal((s.d_in, n_edits))
        r = 0.3 * rng.standard_normal((s.d_out, n_edits))
        layers[s.name] = LayerPayload(delta=global_edit(r, k, REGS[s.name]), kkt=k @ k.T, rkt=r @ k.T)
    return EditPayload(layers=layers, n_edits=n_edits, residual_norms=np.ones(n_edits))


CORPUS = bad_payload_corpus(good_payload(9))


def _strategy(kind: str):
    common = dict(layer_specs=SPECS, max_norm=MAX_NORM, min_fit_clients=1, min_available_clients=1)
    return CollabEdit(regularisers=REGS, **common) if kind == "collabedit" else FedAvg(**common)


def _good_replies():
    return [(Proxy("good-0"), fit_res(encode_payload(good_payload(0)))), (Proxy("good-1"), fit_res(encode_payload(good_payload(1))))]


def _reference(kind: str) -> dict[str, np.ndarray]:
    strategy = _strategy(kind)
    strategy.aggregate_fit(1, _good_replies(), [])
    return strategy.global_update


@pytest.mark.parametrize("kind", ["collabedit", "fedavg"])
@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_a_bad_reply_is_rejected_and_the_round_goes_on(kind, case, caplog):
    strategy = _strategy(kind)
    reason = case.reason
    results, failures = _good_replies(), []
    if case.failure is not None:
        failures.append(case.failure)
    else:
        results.insert(1, (Proxy("bad"), case.reply))
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_fit(1, results, failures)
    assert metrics["applied"] and metrics["n_accepted"] == 2
    if failures:
        assert metrics["n_failures"] == 1 and re.search(reason, strategy.last_failures[0])
        assert "client failure" in caplog.text
    else:
        assert metrics["n_rejected"] == 1
        (cid, why), = strategy.last_rejections
        assert cid == "bad" and re.search(reason, why), why
        assert "rejected the payload of client bad" in caplog.text
    reference = _reference(kind)
    for name, array in strategy.global_update.items():
        assert np.isfinite(array).all()
        np.testing.assert_allclose(array, reference[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["collabedit", "fedavg"])
def test_a_round_of_only_bad_replies_changes_nothing(kind, caplog):
    strategy = _strategy(kind)
    strategy.aggregate_fit(1, _good_replies(), [])  # some state to protect
    before = {name: array.tobytes() for name, array in strategy.global_update.items()}
    kkt_before = {name: a.tobytes() for name, a in getattr(strategy, "kkt_total", {}).items()}
    results, failures = [], []
    for i, case in enumerate(CORPUS):
        if case.failure is not None:
            failures.append(case.failure)
        else:
            results.append((Proxy(f"bad-{i}"), case.reply))
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_fit(2, results, failures)
    assert not metrics["applied"] and metrics["n_accepted"] == 0
    assert metrics["n_rejected"] == len(results) and metrics["n_failures"] == len(failures)
    assert {name: array.tobytes() for name, array in strategy.global_update.items()} == before
    assert {name: a.tobytes() for name, a in getattr(strategy, "kkt_total", {}).items()} == kkt_before
    assert strategy.rounds_merged == 1
    assert caplog.text.count("rejected the payload of client") == len(results)


def test_the_norm_bound_is_configurable():
    big = good_payload(0)
    layers = {name: LayerPayload(delta=layer.delta * 50, kkt=layer.kkt, rkt=layer.rkt) for name, layer in big.layers.items()}
    reply = [(Proxy("big"), fit_res(encode_payload(EditPayload(layers=layers, n_edits=3, residual_norms=np.ones(3)))))]
    norm = max(float(np.linalg.norm(layer.delta)) for layer in layers.values())
    strict = FedAvg(layer_specs=SPECS, max_norm={"delta": norm / 2})
    assert not strict.aggregate_fit(1, reply, [])[1]["applied"]
    loose = FedAvg(layer_specs=SPECS, max_norm={"delta": norm * 2})
    assert loose.aggregate_fit(1, reply, [])[1]["applied"]


# ----------------------------------------------------------------------------- no pickle anywhere

SOURCE_DIRS = [REPO / "src" / "fedke", REPO / "strategies", REPO / "simulations", REPO / "bench"]


def _sources():
    for directory in SOURCE_DIRS:
        yield from sorted(directory.rglob("*.py"))


def test_no_module_unpickles_anything():
    for path in _sources():
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|_pickle|dill|joblib|cloudpickle|shelve|marshal)\b", text, re.M), path
        assert not re.search(r"allow_pickle\s*=\s*True", text), path
        assert not re.search(r"weights_only\s*=\s*False", text), path
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in match.group(1), (path, match.group(0))
        assert not re.search(r"\bpd\.read_pickle|\.to_pickle\(", text), path


def test_files_fedke_writes_are_safetensors_json_or_tables(tiny_bed, cache_dir):
    """The caches (world, world model, statistics) hold only safetensors, JSON, tokenizer JSON and text."""
    allowed = {".safetensors", ".json", ".txt", ".csv", ".parquet", ".jsonl", ".lock", ".md", ".model", ".toml",
               ".jinja"}  # .jinja: the real model's chat template, text written by its tokenizer
    suffixes = {path.suffix for path in Path(cache_dir).rglob("*") if path.is_file()}
    assert suffixes and suffixes <= allowed, suffixes - allowed
    for path in Path(cache_dir).rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".parquet"):
            assert not path.read_bytes()[:2] == b"\x80\x04", path  # a pickle protocol-4 header


def test_checkpoints_are_safetensors_and_json(tmp_path):
    checkpoint = pytest.importorskip("fedke.simulations.checkpoint")
    strategy = _strategy("collabedit")
    strategy.aggregate_fit(1, _good_replies(), [])
    state = strategy.state_dict()
    from safetensors.numpy import load_file, save_file

    save_file(state["arrays"], str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(state["meta"]))
    restored = _strategy("collabedit")
    restored.load_state_dict({"arrays": load_file(str(tmp_path / "state.safetensors")),
                              "meta": json.loads((tmp_path / "state.json").read_text())})
    for name, array in strategy.global_update.items():
        np.testing.assert_array_equal(restored.global_update[name], array)
    text = Path(checkpoint.__file__).read_text()
    assert "safetensors" in text
    assert not re.search(r"^\s*(import|from)\s+\S*pickle", text, re.M)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_client_that_raises_and_one_that_times_out_in_a_real_deployment(tmp_path, monkeypatch):
    """Through Flower for real (loopback SuperLink, 3 SuperNodes): client 1 raises, client 2 sleeps past
    the round timeout; the round merges client 0 alone and says so. The timeout (20 s) leaves client 0
    room to start its ClientApp on a loaded 2-core machine (8 s did not, once in a fresh clone)."""
    from fedke.simulations.deploy import LoopbackDeployment
    from fedke.simulations.synthetic import write_app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    app = write_app(tmp_path / "app", **{"d-in": 32, "d-out": 8, "layers": 2, "edits": 4, "num-clients": 3,
                                          "fail-partition": 1, "slow-partition": 2, "round-timeout": 20.0})
    report = tmp_path / "report.json"
    with LoopbackDeployment(3, flwr_home=tmp_path / "home") as deployment:
        result = deployment.run(app, run_config={"report": str(report)}, timeout_s=240)
    assert result.ok
    got = json.loads(report.read_text())["rounds"][-1]
    assert (got["n_accepted"], got["n_failures"], got["applied"]) == (1, 2, 1.0)
    assert got["n_edits"] == 4
    assert "round 1: client failure" in result.log_text

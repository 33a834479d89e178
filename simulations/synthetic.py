"""Synthetic payloads of any layer shape, and a Flower app that carries them (no model, no download).

GPT-2 XL's MEMIT layers are ``transformer.h.{13..17}.mlp.c_proj`` with ``d_in = 6400`` (the MLP
width) and ``d_out = 1600``: :data:`XL_SPECS`. :func:`synthetic_payload` makes a client's payload
for such layers from random keys ``K`` (``d_in x M``) and residuals ``R`` (``d_out x M``):
``K K^T``, ``R K^T`` and, on request, ``Delta = R K^T (lam I + K K^T)^-1``. Everything is seeded.

The app (:data:`server_app`, :data:`client_app`) runs CollabEdit over such payloads through
``flwr run``, in simulation or on a real deployment: :func:`write_app` writes a ``pyproject.toml``
whose components point at this module. Run-config keys: ``d-in``, ``d-out``, ``layers``,
``edits``, ``lam``, ``num-rounds``, ``wire-dtype``, ``send-delta``, ``psd-check``, ``report``
(a JSON file the ServerApp writes after each round: bytes per client, seconds, the server's
peak RSS, the update's norm), ``num-clients`` (the server waits for them), and for robustness
tests ``fail-partition`` (that client raises), ``slow-partition`` (that client sleeps 10 x
``round-timeout``) and ``round-timeout`` (seconds; 0 = none); ``streaming`` (true: the server's
fit stage is :class:`fedke.simulations.streaming.StreamingServer`, merging each reply as it
arrives). A client's partition id (node config) seeds its payload.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.client import ClientApp
from flwr.server import ServerApp

from fedke.codec import LayerSpec, encode_payload, payload_nbytes
from fedke.payload import EditPayload, LayerPayload

__all__ = ["XL_SPECS", "synthetic_payload", "synthetic_regularisers", "synthetic_specs", "write_app"]


def synthetic_specs(d_in: int = 6400, d_out: int = 1600, layers: int = 5, first: int = 13) -> list[LayerSpec]:
    """``layers`` GPT-2-style ``c_proj`` layers of shape ``(d_out, d_in)`` from block ``first`` on."""
    return [LayerSpec(f"transformer.h.{first + i}.mlp.c_proj", d_out, d_in) for i in range(layers)]


#: GPT-2 XL's MEMIT layers (13-17): d_in 6400, d_out 1600.
XL_SPECS = synthetic_specs()


def synthetic_regularisers(specs, lam: float = 1.0) -> dict[str, np.ndarray]:
    """``lam I`` per layer (a stand-in for ``lam C``; the merge cost is the same)."""
    return {spec.name: lam * np.eye(spec.d_in) for spec in specs}


def synthetic_payload(specs, n_edits: int, seed: int, *, with_delta: bool = False, lam: float = 1.0) -> EditPayload:
    """A client's payload from seeded random ``K`` (unit-variance, ``d_in x M``) and ``R``.

    ``with_delta`` also solves ``Delta = R K^T (lam I + K K^T)^-1`` (Cholesky, ``O(d_in^3)``).
    """
    import scipy.linalg

    rng = np.random.default_rng(seed)
    layers = {}
    for spec in specs:
        keys = rng.standard_normal((spec.d_in, n_edits)) / np.sqrt(spec.d_in)
        residuals = rng.standard_normal((spec.d_out, n_edits))
        kkt = keys @ keys.T
        rkt = residuals @ keys.T
        delta = None
        if with_delta:
            factor = scipy.linalg.cho_factor(lam * np.eye(spec.d_in) + kkt)
            delta = scipy.linalg.cho_solve(factor, rkt.T).T
        layers[spec.name] = LayerPayload(delta=delta, kkt=kkt, rkt=rkt)
    return EditPayload(layers=layers, n_edits=n_edits, residual_norms=np.ones(n_edits))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status`` (the high-water
    mark of this process's own memory; ``ru_maxrss`` would carry a parent's peak over ``exec``), else
    ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- the Flower app

DEFAULTS: dict[str, Any] = {"d-in": 6400, "d-out": 1600, "layers": 5, "edits": 16, "lam": 1.0, "num-rounds": 1,
                            "wire-dtype": "float32", "send-delta": False, "psd-check": False, "report": "",
                            "num-clients": 2, "fail-partition": -1, "slow-partition": -1, "round-timeout": 0.0,
                            "streaming": False}


def _settings(run_config) -> dict[str, Any]:
    return {key: type(default)(run_config.get(key, default)) for key, default in DEFAULTS.items()}


def _client_fn(context):
    from flwr.client import NumPyClient

    settings = _settings(context.run_config)
    specs = synthetic_specs(settings["d-in"], settings["d-out"], settings["layers"])
    partition = int(context.node_config.get("partition-id", 0))

    class SyntheticClient(NumPyClient):
        def fit(self, parameters, config):
            if partition == settings["fail-partition"]:
                raise RuntimeError(f"synthetic client {partition} fails on purpose")
            if partition == settings["slow-partition"]:
                time.sleep(settings["round-timeout"] + 120.0)  # well past the round timeout (the deployment ends it)
            payload = synthetic_payload(specs, settings["edits"], seed=1000 * int(config.get("server_round", 1)) + partition,
                                        with_delta=settings["send-delta"], lam=settings["lam"])
            arrays = encode_payload(payload, dtype=settings["wire-dtype"], send_delta=settings["send-delta"])
            return arrays, payload.n_edits, {"payload_bytes": payload_nbytes(arrays)}

    return SyntheticClient().to_client()


def _server_fn(context):
    from flwr.server import ServerAppComponents, ServerConfig

    from fedke.strategies import CollabEdit

    settings = _settings(context.run_config)
    specs = synthetic_specs(settings["d-in"], settings["d-out"], settings["layers"])
    n = settings["num-clients"]
    report = settings["report"]
    rounds: list[dict] = []
    started = time.perf_counter()

    def on_round_end(server_round, metrics):
        entry = {"round": int(server_round), "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                 **{k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in metrics.items()}}
        rounds.append(entry)
        if report:
            path = Path(report)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": settings, "rounds": rounds}, indent=1))
            os.replace(tmp, path)

    strategy = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs, settings["lam"]),
                          use_sums=True, max_norm=None, psd_tol=1e-6 if settings["psd-check"] else None,
                          min_fit_clients=n, min_available_clients=n, min_evaluate_clients=0, fraction_evaluate=0.0,
                          wire_dtype=settings["wire-dtype"], on_round_end=on_round_end,
                          on_fit_config_fn=None)
    timeout = settings["round-timeout"] or None
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=settings["num-rounds"], round_timeout=timeout))


server_app = ServerApp()


@server_app.main()
def _main(grid, context) -> None:
    """What ``ServerApp(server_fn=_server_fn)`` runs (``start_grid``); with ``streaming``, the streaming fit stage."""
    from flwr.server import SimpleClientManager
    from flwr.server.compat import start_grid

    components = _server_fn(context)
    server = None
    if _settings(context.run_config)["streaming"]:
        from .streaming import StreamingServer

        server = StreamingServer(client_manager=SimpleClientManager(), strategy=components.strategy)
    start_grid(server=server, config=components.config, strategy=None if server is not None else components.strategy,
               grid=grid)
client_app = ClientApp(client_fn=_client_fn)


def write_app(directory: str | Path, **config: Any) -> Path:
    """A Flower app directory whose components are this module's apps; ``config`` overrides :data:`DEFAULTS`.

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedke-synthetic", "version": "0.1.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedke",
            "components": {"serverapp": "fedke.simulations.synthetic:server_app",
                           "clientapp": "fedke.simulations.synthetic:client_app"},
            "config": {**DEFAULTS, **config},
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory

"""Privacy and robustness: CollabEdit under SecAgg+, bad payloads, GPT-2 XL-sized layers, K K^T inversion.

Usage::

    python bench/privacy.py --out bench/results/privacy.json [--quick]

Writes exactly::

    {"secagg": {"rel_error", "score_plain", "score_secagg", "seconds"},
     "bad_payloads": {"cases", "rejected", "model_unchanged"},
     "large_layers": {"bytes_per_client_round", "peak_rss_mb"},
     "kkt_inversion": {"M": [...], "cosine": [...], "reid_top1": [...]}}

and prints a table per section with more detail.

* ``secagg``: 5 clients (round 1 of the default world's scenario, ``--quick``: the tiny world)
  edit once; their payloads are merged by plain CollabEdit and by CollabEdit over SecAgg+
  (Flower's own clipping, stochastic quantisation and modular sum, :mod:`fedke.simulations.secure`;
  the masks cancel exactly and are left out). ``rel_error``: relative Frobenius error of the
  merged update; ``seconds``: the SecAgg+ path (scaling, quantised sum, recovery, merge). Targets:
  ``rel_error < 1e-3``, ``|score_plain - score_secagg| <= 0.5``.
* ``bad_payloads``: every case of :func:`fedke.badpayloads.bad_payload_corpus`, each next to two
  good clients, through CollabEdit's ``aggregate_fit``; ``rejected`` counts those rejected (or
  counted as failures); ``model_unchanged``: every merge equals the good clients' merge and a round
  of only bad replies leaves the state bit for bit.
* ``large_layers``: GPT-2 XL's shapes (5 layers, d_in 6400, d_out 1600; ``--quick``: d_in 640,
  d_out 160), synthetic payloads of 16 edits. ``bytes_per_client_round``: what fedke's client
  sends by default (Delta, packed K K^T, R K^T; float32). ``peak_rss_mb``: peak RSS of a fresh
  server process that receives 4 clients' replies as Flower bytes and runs CollabEdit's
  ``aggregate_fit`` (PSD check off: one Cholesky per layer and client). The table adds the
  sums-only and float16 sizes, the float16 errors, and the server's decode-and-accumulate peak for
  2 and 4 clients (what would grow with N if replies were hoarded).
* ``kkt_inversion``: :func:`fedke.privacy.inversion_curve` on the world model (first edited layer),
  M in {1, 2, 4, 8, 16, 32}; the table adds the same for an attacker holding K itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402


def log(message: str) -> None:
    print(f"[privacy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- SecAgg+


def bench_secagg(quick: bool) -> dict:
    from fedke.simulations.scenario import Scenario
    from fedke.simulations.secure import compare_secagg

    if quick:
        scenario = Scenario.from_preset("tiny", num_rounds=1, num_clients=5)
    else:
        scenario = Scenario(model="world", num_clients=5, edits_per_client=50, num_rounds=1)
    log(f"secagg: {scenario.num_clients} clients x {scenario.edits_per_client} edits")
    result = compare_secagg(scenario)
    strategy = result.strategy
    print_table([{"clients": scenario.num_clients, "edits": scenario.edits_per_client, "rel_error": f"{result.rel_error:.2e}",
                  "score_plain": result.score_plain, "score_secagg": result.score_secagg,
                  "T": strategy.quantization_range, "B_kkt": strategy.bounds.kkt, "B_rkt": strategy.bounds.rkt,
                  "edit_s": result.seconds["client_edits"], "plain_merge_s": result.seconds["plain_merge"],
                  "secagg_s": result.seconds["secagg_merge"]}],
                ["clients", "edits", "rel_error", "score_plain", "score_secagg", "T", "B_kkt", "B_rkt", "edit_s",
                 "plain_merge_s", "secagg_s"], "CollabEdit: plain vs SecAgg+ (same payloads)")
    print(f"rel_error = {result.rel_error:.3e}")
    return {"rel_error": result.rel_error, "score_plain": result.score_plain, "score_secagg": result.score_secagg,
            "seconds": result.seconds["secagg_merge"]}


# ----------------------------------------------------------------------------- bad payloads


def bench_bad_payloads() -> dict:
    from fedke.badpayloads import bad_payload_corpus
    from fedke.codec import encode_payload
    from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers, synthetic_specs
    from fedke.strategies import CollabEdit
    from fedke.badpayloads import fit_res

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    specs = synthetic_specs(d_in=16, d_out=6, layers=2)
    regs = synthetic_regularisers(specs, 2.0)

    def strategy():
        return CollabEdit(layer_specs=specs, regularisers=regs, min_fit_clients=1, min_available_clients=1)

    good = [(Proxy(f"good-{i}"), fit_res(encode_payload(synthetic_payload(specs, 3, seed=i, with_delta=True, lam=2.0))))
            for i in range(2)]
    reference = strategy()
    reference.aggregate_fit(1, good, [])
    corpus = bad_payload_corpus(synthetic_payload(specs, 3, seed=9, with_delta=True, lam=2.0))
    rows, rejected, unchanged = [], 0, True
    for case in corpus:
        merged = strategy()
        results = list(good) if case.failure is not None else [good[0], (Proxy("bad"), case.reply), good[1]]
        _, metrics = merged.aggregate_fit(1, results, [case.failure] if case.failure is not None else [])
        caught = metrics["n_rejected"] + metrics["n_failures"] == 1 and metrics["n_accepted"] == 2
        same = all(np.allclose(merged.global_update[k], reference.global_update[k], rtol=1e-12, atol=1e-14)
                   for k in reference.global_update)
        reason = merged.last_rejections[0][1] if merged.last_rejections else (merged.last_failures or [""])[0]
        rejected += int(caught)
        unchanged &= same
        rows.append({"case": case.name, "rejected": caught, "merge_ok": same, "reason": reason[:70]})
    all_bad = strategy()
    all_bad.aggregate_fit(1, good, [])
    before = {k: v.tobytes() for k, v in all_bad.global_update.items()}
    _, metrics = all_bad.aggregate_fit(2, [(Proxy(c.name), c.reply) for c in corpus if c.reply is not None],
                                       [c.failure for c in corpus if c.failure is not None])
    unchanged &= (not metrics["applied"]) and {k: v.tobytes() for k, v in all_bad.global_update.items()} == before
    print_table(rows, ["case", "rejected", "merge_ok", "reason"], "Bad payloads (each next to two good clients)")
    print(f"all-bad round: applied={metrics['applied']}, state unchanged bit for bit: "
          f"{ {k: v.tobytes() for k, v in all_bad.global_update.items()} == before}")
    return {"cases": len(corpus), "rejected": rejected, "model_unchanged": bool(unchanged)}


# ----------------------------------------------------------------------------- large layers

_SERVER = r"""
import json, sys, time, tracemalloc
from pathlib import Path
from flwr.common import Code, FitRes, Parameters, Status
from fedke.simulations.synthetic import synthetic_regularisers, synthetic_specs, peak_rss_mb  # VmHWM
from fedke.strategies import CollabEdit
d_in, d_out, layers, n, merge = (int(x) for x in sys.argv[1:6]); folder = Path(sys.argv[6])
specs = synthetic_specs(d_in, d_out, layers)
class Proxy:
    def __init__(self, cid): self.cid = cid
baseline = peak_rss_mb()
results = []
for i in range(n):  # what Flower's server holds before aggregate_fit: every reply's bytes
    tensors = [p.read_bytes() for p in sorted((folder / str(i)).iterdir())]
    results.append((Proxy(str(i)), FitRes(Status(Code.OK, ""), Parameters(tensors, "numpy.ndarray"), 16, {})))
held = peak_rss_mb()
strategy = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs), max_norm=None, psd_tol=None)
tracemalloc.start()
t0 = time.perf_counter()
if merge:
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["applied"], metrics
else:  # decode and accumulate only (what grows with N if a strategy hoards)
    from fedke.strategies.base import decode_reply
    merger = strategy.new_merger()
    for _, res in results:
        merger.add(decode_reply(res, expected=specs, max_norm=None, psd_tol=None), 16.0)
        del res
traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps({"n": n, "merge": bool(merge), "seconds": time.perf_counter() - t0, "baseline_rss_mb": baseline,
                  "held_rss_mb": held,
                  "peak_rss_mb": peak_rss_mb(), "strategy_peak_mb": traced_peak}))
"""


def _with_cheap_delta(payload):
    """``payload`` with a stand-in ``delta`` of the right shape (its values do not matter to the sums
    form of CollabEdit, which merges ``rkt``; solving for the real one at d_in 6400 costs a minute)."""
    from fedke.payload import EditPayload, LayerPayload

    layers = {name: LayerPayload(delta=0.01 * layer.rkt, kkt=layer.kkt, rkt=layer.rkt) for name, layer in payload.layers.items()}
    return EditPayload(layers=layers, n_edits=payload.n_edits, residual_norms=payload.residual_norms)


def _write_replies(folder: Path, specs, n: int, dtype: str) -> int:
    """``n`` clients' default payloads (delta, packed kkt, rkt) as Flower bytes, one file per array."""
    from flwr.common import ndarrays_to_parameters

    from fedke.codec import encode_payload, payload_nbytes
    from fedke.simulations.synthetic import synthetic_payload

    nbytes = 0
    for i in range(n):
        payload = _with_cheap_delta(synthetic_payload(specs, 16, seed=i))
        arrays = encode_payload(payload, dtype=dtype)
        nbytes = payload_nbytes(arrays)
        del payload
        target = folder / str(i)
        target.mkdir(parents=True, exist_ok=True)
        for index, tensor in enumerate(ndarrays_to_parameters(arrays).tensors):
            (target / f"{index:04d}.npy").write_bytes(tensor)
        del arrays
        log(f"large layers: client {i} written ({nbytes / 2**20:.0f} MiB)")
    return nbytes


def _server_run(specs, n: int, merge: bool, folder: Path) -> dict:
    spec = specs[0]
    out = subprocess.run([sys.executable, "-c", _SERVER, str(spec.d_in), str(spec.d_out), str(len(specs)), str(n),
                          str(int(merge)), str(folder)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _float16_errors(specs) -> dict:
    """Relative errors of float16 vs float32 transport: the decoded arrays and the merged update (2 clients)."""
    from fedke.codec import decode_payload, encode_payload
    from fedke.simulations.synthetic import synthetic_payload, synthetic_regularisers
    from fedke.strategies import CollabEdit

    one = specs[:1]
    merged = {}
    errors = {}
    payloads = [synthetic_payload(one, 16, seed=i) for i in range(2)]
    for dtype in ("float32", "float16"):
        strategy = CollabEdit(layer_specs=one, regularisers=synthetic_regularisers(one), max_norm=None, psd_tol=None)
        decoded = [decode_payload(encode_payload(p, dtype=dtype, send_delta=False)) for p in payloads]
        merged[dtype] = strategy.merge(decoded)[one[0].name]
        if dtype == "float16":
            for array in ("kkt", "rkt"):
                exact = getattr(payloads[0].layers[one[0].name], array)
                got = getattr(decoded[0].layers[one[0].name], array)
                errors[f"{array}_rel_error"] = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    errors["update_rel_error"] = float(np.linalg.norm(merged["float16"] - merged["float32"]) / np.linalg.norm(merged["float32"]))
    return errors


def bench_large_layers(quick: bool) -> dict:
    from fedke.codec import encode_payload, payload_nbytes
    from fedke.simulations.synthetic import synthetic_payload, synthetic_specs

    specs = synthetic_specs(640, 160, 5) if quick else synthetic_specs()
    spec = specs[0]
    log(f"large layers: {len(specs)} layers of ({spec.d_out}, {spec.d_in})")
    one = _with_cheap_delta(synthetic_payload(specs[:1], 16, seed=0))
    sizes = {}
    for dtype in ("float32", "float16"):
        for label, send_delta in (("full", True), ("sums", False)):
            arrays = encode_payload(one, dtype=dtype, send_delta=send_delta)
            body = payload_nbytes(arrays) - arrays[0].nbytes - arrays[-1].nbytes
            sizes[f"{label}_{dtype}_MiB"] = len(specs) * body / 2**20
    del one
    errors = _float16_errors(specs)
    with tempfile.TemporaryDirectory(prefix="fedke-xl-") as tmp:
        nbytes = _write_replies(Path(tmp), specs, 4, "float32")
        runs = [_server_run(specs, 2, False, Path(tmp)), _server_run(specs, 4, False, Path(tmp)),
                _server_run(specs, 4, True, Path(tmp))]
    rows = [{"clients": r["n"], "merge": r["merge"], "imports_MiB": r["baseline_rss_mb"],
             "replies_held_MiB": r["held_rss_mb"], "peak_rss_MiB": r["peak_rss_mb"],
             "strategy_peak_MiB": r["strategy_peak_mb"], "seconds": r["seconds"]} for r in runs]
    gram_mib = len(specs) * 8 * spec.d_in ** 2 / 2**20
    print_table([{"layers": len(specs), "d_in": spec.d_in, "d_out": spec.d_out, "bytes_default": nbytes,
                  **sizes, **{k: f"{v:.2e}" for k, v in errors.items()}}],
                ["layers", "d_in", "d_out", "bytes_default", "full_float32_MiB", "sums_float32_MiB", "full_float16_MiB",
                 "sums_float16_MiB", "kkt_rel_error", "rkt_rel_error", "update_rel_error"],
                "Per-client payload (16 edits); float16 transport error")
    print_table(rows, ["clients", "merge", "imports_MiB", "replies_held_MiB", "peak_rss_MiB", "strategy_peak_MiB", "seconds"],
                f"Server process (layers x d_in^2 float64 = {gram_mib:.0f} MiB)")
    return {"bytes_per_client_round": int(nbytes), "peak_rss_mb": float(runs[-1]["peak_rss_mb"])}


# ----------------------------------------------------------------------------- K K^T inversion


def bench_kkt_inversion(quick: bool) -> dict:
    from fedke.privacy import inversion_curve
    from fedke.simulations.runtime import testbed_for
    from fedke.simulations.scenario import Scenario

    scenario = Scenario.from_preset("tiny") if quick else Scenario.from_preset("world")
    bed = testbed_for(scenario, progress=True)
    editor = bed.editor(**scenario.memit_overrides())
    log(f"kkt inversion: world of {len(bed.world.subjects)} subjects")
    curve = inversion_curve(bed.world, editor, (1, 2, 4, 8, 16, 32), trials=2 if quick else 5, seed=0)
    rows = [{"M": m, "cosine": c, "reid_top1": r, "cosine_K": ck, "reid_top1_K": rk}
            for m, c, r, ck, rk in zip(curve["M"], curve["cosine"], curve["reid_top1"], curve["cosine_K"],
                                       curve["reid_top1_K"])]
    print_table(rows, ["M", "cosine", "reid_top1", "cosine_K", "reid_top1_K"],
                f"K K^T inversion ({curve['layer']}; {curve['dictionary_size']} candidate prompts, "
                f"chance 1/{len(bed.world.subjects)}; _K: attacker holding K)")
    return {"M": curve["M"], "cosine": curve["cosine"], "reid_top1": curve["reid_top1"]}


SECTIONS = ("secagg", "bad_payloads", "large_layers", "kkt_inversion")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="tiny world, scaled-down layers")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of the sections to run; the others are kept from --out")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    if args.quick and not os.environ.get("FEDKE_CACHE"):
        log("--quick uses the tiny world model (set FEDKE_CACHE to reuse a cache)")
    started = time.perf_counter()
    previous = {}
    if set(wanted) != set(SECTIONS):
        if not (args.out and Path(args.out).is_file()):
            parser.error("--sections with a subset needs an existing --out file holding the other sections")
        previous = json.loads(Path(args.out).read_text())
    runners = {"secagg": lambda: bench_secagg(args.quick), "bad_payloads": bench_bad_payloads,
               "large_layers": lambda: bench_large_layers(args.quick), "kkt_inversion": lambda: bench_kkt_inversion(args.quick)}
    result = {name: runners[name]() if name in wanted else previous[name] for name in SECTIONS}
    log(f"done in {time.perf_counter() - started:.0f} s (peak RSS of this process {peak_rss_mb():.0f} MiB)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

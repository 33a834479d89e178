"""Privacy and robustness: CollabEdit under SecAgg+, bad payloads, GPT-2 XL-sized layers, K K^T inversion.

Usage::

    python bench/privacy.py --out bench/results/privacy.json [--quick]
    python bench/privacy.py --model smollm2 --sections attacks --out bench/results/privacy_smollm2.json

Writes exactly::

    {"secagg": {"rel_error", "score_plain", "score_secagg", "seconds"},
     "bad_payloads": {"cases", "rejected", "model_unchanged"},
     "large_layers": {"bytes_per_client_round", "peak_rss_mb"},
     "kkt_inversion": {"M": [...], "cosine": [...], "reid_top1": [...]},
     "attacks": {"edits_per_client": [...], "kkt_top1": [...], "delta_top1": [...], "pool_size": n,
                 "chance_top1": 1/n, "secagg_sum": {...}, ...}}

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
* ``attacks`` (``--model world|smollm2``; the other sections always run on the world model): what the
  server learns from one client's payload at its first edited layer, against a candidate pool of
  every fact of the model's fact set (each fact's own prompt template; the world model: every
  template, as its edits draw one; ``pool_size``: distinct subjects, ``pool_prompts``: candidate
  keys, ``chance_top1 = 1 / pool_size``). On SmolLM2 the pool adds the public fact table's facts the
  model does not hold (``realfacts.json``, each in its relation's edit template): 3,802 prompts;
  ``held_pool`` repeats the figures against the 1,215 held facts alone. A client of M edits (distinct subjects; SmolLM2:
  M in {1, 2, 5, 10, 20, 50}, ``--quick``: {1, 2, 5, 10}) sends its float32 payload; the figures
  are means over the disjoint clients that the fixed set of edit requests allows.
  ``kkt_top1``: the eigenvector attack of :func:`fedke.privacy.reidentify` on K K^T;
  ``kkt_subspace_top1``: subspace membership in the top-M eigenvectors of K K^T;
  ``delta_top1``: subspace membership in the row space of Delta A0 (:func:`fedke.privacy.delta_key_basis`,
  A0 = lam C0 the public regulariser); ``delta_naive_top1``: the same on Delta's own row space.
  Subspace scores rank the subjects; a client's figure is the fraction of its M subjects among the
  top M (top-1 for M = 1). The target vectors of the edit requests are optimised ONCE and each
  client's payload is the editor's own (``MemitEditor.edit_with_internals`` with the targets'
  subset), as targets are optimised per request.
  ``secagg_sum``: 10 clients edit over SecAgg+ (Flower's quantised modular sum, fedke's two-limb
  layout, :func:`fedke.simulations.secure.secagg_results`); the server decodes only the sums and
  publishes the merged Delta. ``union_*``: the union of subjects recovered from the sums;
  ``per_client_*``: the per-client attack run on the sums (a client's M subjects guessed as the
  top M): chance is ``1 / clients``, and ``resplit_rel_diff`` shows that another split of the
  same edits gives the same sums. ``union_curve``: the summed K K^T of 10 clients x E edits
  (E up to 50) from the pool's keys.
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


# ----------------------------------------------------------------------------- attacks


def _attack_scenario(model: str, quick: bool, cache_dir: str):
    from fedke.simulations.scenario import Scenario

    common = dict(num_rounds=1, strategy="collabedit", secure_aggregation=False)
    if model == "smollm2":
        return Scenario(model="smollm2", num_clients=10, edits_per_client=5, cache_dir=cache_dir, **common)
    if quick:
        return Scenario.from_preset("tiny", num_clients=10, edits_per_client=1, cache_dir=cache_dir, **common)
    return Scenario.from_preset("world", num_clients=10, edits_per_client=5, cache_dir=cache_dir, **common)


def _distinct_subject_cases(facts, n: int, seed: int) -> list:
    from fedke.privacy import distinct_subject_cases

    chosen = distinct_subject_cases(facts.edit_cases(None, seed=seed), n)
    if len(chosen) < n:
        raise ValueError(f"the fact set has fewer than {n} distinct subjects")
    return chosen


def _wire(array) -> np.ndarray:
    """What the server decodes from a float32 payload."""
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def bench_attacks(model: str, quick: bool, cache_dir: str) -> dict:
    from flwr.common import parameters_to_ndarrays

    from fedke import privacy as pv
    from fedke.simulations.runtime import testbed_for
    from fedke.simulations.secure import secagg_results
    from fedke.simulations.wiring import build_strategy
    from fedke.strategies.secagg import decode_secagg_sum

    started = time.perf_counter()
    scenario = _attack_scenario(model, quick, cache_dir)
    bed = testbed_for(scenario, progress=True)
    editor = bed.editor(**scenario.memit_overrides())
    layer = editor.layer_names[0]
    a0 = editor.regularisers()[layer]
    sizes = (1, 2, 5, 10) if quick else (1, 2, 5, 10, 20, 50)
    n_edits = max(sizes)

    from fedke.data.factset import FactSet

    if isinstance(bed.facts, FactSet):  # a real fact set: each fact in its own (fixed) prompt template
        pool_requests = [case.request for case in bed.facts.edit_cases(None, seed=0)]
        n_held = len(pool_requests)
        if model == "smollm2" and not scenario.dataset:  # + the public table's facts the model does not hold
            from fedke.data.records import EditRequest
            from fedke.data.realfacts import load_fact_table

            held = {(r.subject, r.relation_id) for r in pool_requests}
            for relation in load_fact_table().relations:
                for subject, obj in relation.facts:
                    if (subject, relation.relation_id) in held:
                        continue
                    try:  # the editor's own request checks (a key needs none of the target, but keys() checks)
                        decoy = EditRequest(relation.templates[0], subject, obj, relation.relation_id, obj)
                        editor._check_requests([decoy])
                    except Exception as error:  # noqa: BLE001 - a table row the editor refuses is left out
                        log(f"attacks: pool leaves out {subject!r} ({relation.relation_id}): {error}")
                        continue
                    pool_requests.append(decoy)
        labels = [request.subject for request in pool_requests]
        log(f"attacks: pool keys of {len(pool_requests)} facts ({len(set(labels))} subjects; {n_held} facts held "
            f"by the model, {len(set(labels[:n_held]))} subjects) at {layer}")
        pool = editor.keys(pool_requests, batch_size=64)[layer]
    else:  # the world draws an edit's template at random: every (subject, relation, template)
        pool, labels = pv.world_dictionary(bed.facts, editor, layer)
        n_held = len(labels)
    pool_size = len(set(labels))
    pools = {"full": (pool, labels), "held": (pool[:, :n_held], labels[:n_held])}

    cases = _distinct_subject_cases(bed.facts, n_edits, seed=1)
    requests = [case.request for case in cases]
    log(f"attacks: target vectors of {n_edits} edit requests (once)")
    t0 = time.perf_counter()
    targets = editor.compute_targets(requests, progress=True)
    target_seconds = time.perf_counter() - t0

    def edit(indices):
        payload, internals = editor.edit_with_internals([requests[i] for i in indices], targets=targets.subset(indices))
        return payload, internals.keys[layer]

    figures = ("kkt_top1", "kkt_subspace_top1", "delta_top1", "delta_naive_top1")
    per_size = {key: [] for key in ("clients", *figures, "delta_true_min_score", "delta_other_max_score",
                                    "delta_naive_true_min_score", "delta_naive_other_max_score")}
    held_pool = {"pool_size": len(set(pools["held"][1])), "pool_prompts": int(n_held), **{k: [] for k in figures}}
    for m in sizes:
        rows, held_rows = [], []
        for t in range(n_edits // m):
            indices = list(range(t * m, (t + 1) * m))
            payload, keys = edit(indices)
            subjects = [requests[i].subject for i in indices]
            delta, kkt = _wire(payload.layers[layer].delta), _wire(payload.layers[layer].kkt)
            vectors = pv.top_eigenvectors(kkt, m)  # one eigendecomposition for both K K^T attacks
            basis, naive = pv.delta_key_basis(delta, a0, m), pv.row_space_basis(delta, m)
            for (candidates, names), out in ((pools["full"], rows), (pools["held"], held_rows)):
                out.append([pv.reidentify_from_vectors(vectors, keys, subjects, candidates, names)[1],
                            pv.subspace_reidentify(vectors, candidates, names, subjects),
                            pv.subspace_reidentify(basis, candidates, names, subjects),
                            pv.subspace_reidentify(naive, candidates, names, subjects)])
            truth = np.isin(np.array(labels, dtype=object), np.array(subjects, dtype=object))
            for scored in (basis, naive):  # the true keys' lowest score and the best other candidate's
                scores = pv.subspace_scores(scored, pool)
                rows[-1] += [float(np.min(pv.subspace_scores(scored, keys))), float(np.max(scores[~truth]))]
        mean = np.mean(np.array(rows), axis=0)
        per_size["clients"].append(len(rows))
        for key, value in zip(list(per_size)[1:], mean):
            per_size[key].append(float(value))
        for key, value in zip(figures, np.mean(np.array(held_rows), axis=0)):
            held_pool[key].append(float(value))
        log(f"attacks: M={m}: {len(rows)} clients, kkt {mean[0]:.3f}, delta {mean[2]:.3f}")

    # ---- secure aggregation: 10 clients, the server decodes only the sums
    n_clients = 10
    share = n_edits // n_clients
    secure = replace(scenario, num_clients=n_clients, edits_per_client=share, secure_aggregation=True)
    strategy = build_strategy(secure, evaluate=False, wait_for_clients=False)
    splits = [list(range(c * share, (c + 1) * share)) for c in range(n_clients)]
    edited = [edit(split) for split in splits]
    payloads = [payload for payload, _ in edited]
    peaks = {"kkt": max(float(np.abs(p.layers[n].kkt).max()) for p in payloads for n in p.layers),
             "rkt": max(float(np.abs(p.layers[n].rkt).max()) for p in payloads for n in p.layers)}
    raised = peaks["kkt"] > strategy.bounds.kkt or peaks["rkt"] > strategy.bounds.rkt
    if raised:  # the clients would refuse to send: the server raises its public bounds (as the error asks)
        log(f"attacks: raising the SecAgg bounds to 2x the peaks {peaks}")
        strategy.bounds = replace(strategy.bounds, kkt=max(strategy.bounds.kkt, 2 * peaks["kkt"]),
                                  rkt=max(strategy.bounds.rkt, 2 * peaks["rkt"]))
    results = secagg_results(strategy, payloads)
    sums, count = decode_secagg_sum(parameters_to_ndarrays(results[0][1].parameters), n_clients,
                                    strategy.layer_specs, strategy.bounds)
    _, metrics = strategy.aggregate_fit(1, results, [])
    if not metrics.get("applied"):
        raise RuntimeError(f"the secure aggregate was not applied: {metrics.get('error')}")
    kkt_sum, rkt_sum, total = sums.layers[layer].kkt, sums.layers[layer].rkt, sums.n_edits
    published = np.asarray(strategy.global_update[layer], dtype=np.float64)  # what every client receives
    exact_kkt = sum(p.layers[layer].kkt for p in payloads)
    union = [requests[i].subject for split in splits for i in split]
    truth = [[requests[i].subject for i in split] for split in splits]
    union_keys = np.concatenate([keys for _, keys in edited], axis=1)
    kkt_basis = pv.top_eigenvectors(kkt_sum, total)
    delta_basis = pv.delta_key_basis(published, a0, total)
    client_vectors = pv.top_eigenvectors(kkt_sum, share)  # the sum read as if it were one client's
    eigen_per_client = [pv.reidentify_from_vectors(client_vectors, union_keys[:, split], subjects, pool, labels)[1]
                        for split, subjects in zip(splits, truth)]
    other = np.random.default_rng(0).permutation(n_edits)[:n_clients * share]
    resplit = sum(edit(sorted(other[c * share:(c + 1) * share].tolist()))[0].layers[layer].kkt for c in range(n_clients))
    secagg = {
        "clients": n_clients, "edits_per_client": share, "total_edits": int(total), "bounds_raised": bool(raised),
        "sum_rel_error": float(np.linalg.norm(kkt_sum - exact_kkt) / np.linalg.norm(exact_kkt)),
        "merged_vs_sums_rel_error": float(np.linalg.norm(published - pv.merged_delta(rkt_sum, kkt_sum, a0))
                                          / np.linalg.norm(published)),
        "union_kkt_top1": pv.subspace_reidentify(kkt_basis, pool, labels, union),
        "union_kkt_eigen_top1": pv.reidentify_from_vectors(kkt_basis, union_keys, union, pool, labels)[1],
        "union_delta_top1": pv.subspace_reidentify(delta_basis, pool, labels, union),
        "per_client_kkt_top1": pv.per_client_precision(kkt_basis, pool, labels, truth),
        "per_client_delta_top1": pv.per_client_precision(delta_basis, pool, labels, truth),
        "per_client_kkt_eigen_top1": float(np.mean(eigen_per_client)),
        "chance_per_client": share / (n_clients * share),
        "chance_union": total / pool_size,
        "resplit_rel_diff": float(np.linalg.norm(resplit - exact_kkt) / np.linalg.norm(exact_kkt)),
    }
    log(f"attacks: secagg sums: union {secagg['union_kkt_top1']:.3f} / {secagg['union_delta_top1']:.3f}, "
        f"per client {secagg['per_client_kkt_top1']:.3f}")

    # ---- what the summed K K^T reveals as the union grows (the pool's own keys; no targets needed)
    curve = {"edits_per_client": [], "total_edits": [], "kkt_top1": []}
    per_subject = {}
    for index, label in enumerate(labels):
        per_subject.setdefault(label, index)
    order = np.random.default_rng(2).permutation([i for i in per_subject.values() if i < n_held])  # held facts
    for e in sizes:
        if n_clients * e > min(len(order), pool.shape[0] - 1):
            break
        picked = order[:n_clients * e]
        keys = pool[:, picked]
        curve["edits_per_client"].append(int(e))
        curve["total_edits"].append(int(n_clients * e))
        curve["kkt_top1"].append(pv.subspace_reidentify(pv.top_eigenvectors(keys @ keys.T, len(picked)), pool, labels,
                                                        [labels[i] for i in picked]))
    secagg["union_curve"] = curve

    out = {"model": model, "layer": layer, "edits_per_client": list(sizes), **per_size,
           "pool_size": int(pool_size), "pool_prompts": int(pool.shape[1]), "chance_top1": 1.0 / pool_size,
           "chance_precision": [m / pool_size for m in sizes], "held_pool": held_pool, "d_in": int(pool.shape[0]),
           "d_out": int(published.shape[0]), "target_seconds": target_seconds,
           "seconds": time.perf_counter() - started, "secagg_sum": secagg}
    rows = [{"M": m, "clients": c, "kkt_eigen": k, "kkt_subspace": ks, "delta": d, "delta_naive": dn,
             "true_min": tmin, "other_max": omax, "naive_true_min": ntmin, "naive_other_max": nomax, "chance": m / pool_size}
            for m, c, k, ks, d, dn, tmin, omax, ntmin, nomax in zip(sizes, *(per_size[key] for key in per_size))]
    print_table(rows, ["M", "clients", "kkt_eigen", "kkt_subspace", "delta", "delta_naive", "true_min", "other_max",
                       "naive_true_min", "naive_other_max", "chance"],
                f"Subject re-identification from one client's payload ({model}, {layer}; pool of {pool_size} "
                f"subjects / {pool.shape[1]} prompts; true_min / other_max: Delta-attack scores)")
    print_table([{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in secagg.items() if k != "union_curve"}],
                [k for k in secagg if k != "union_curve"], "Under SecAgg+: what the sums reveal")
    print_table([{"E": e, "total": t, "union_kkt_top1": r} for e, t, r in
                 zip(curve["edits_per_client"], curve["total_edits"], curve["kkt_top1"])],
                ["E", "total", "union_kkt_top1"], f"Union of {n_clients} clients x E edits from the summed K K^T")
    print_table([{"M": m, **{k: held_pool[k][i] for k in figures}} for i, m in enumerate(sizes)], ["M", *figures],
                f"The same against the held facts alone ({held_pool['pool_size']} subjects / {n_held} prompts)")
    return out


SECTIONS = ("secagg", "bad_payloads", "large_layers", "kkt_inversion", "attacks")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="tiny world, scaled-down layers")
    parser.add_argument("--model", choices=("world", "smollm2"), default="world",
                        help="the model of the attacks section (the other sections run on the world model)")
    parser.add_argument("--cache-dir", default="", help="the attacks section's cache (default: FEDKE_CACHE)")
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
        if args.out and Path(args.out).is_file():
            previous = json.loads(Path(args.out).read_text())
        else:
            log("--sections with a subset and no --out file yet: writing only those sections")
    runners = {"secagg": lambda: bench_secagg(args.quick), "bad_payloads": bench_bad_payloads,
               "large_layers": lambda: bench_large_layers(args.quick), "kkt_inversion": lambda: bench_kkt_inversion(args.quick),
               "attacks": lambda: bench_attacks(args.model, args.quick, args.cache_dir)}
    result = {name: runners[name]() if name in wanted else previous[name] for name in SECTIONS
              if name in wanted or name in previous}
    log(f"done in {time.perf_counter() - started:.0f} s (peak RSS of this process {peak_rss_mb():.0f} MiB)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

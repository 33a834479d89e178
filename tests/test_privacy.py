"""fedke.privacy: the K K^T inversion study (exact maths by hand, then the tiny world)."""

from __future__ import annotations

import numpy as np
import pytest

from fedke.privacy import (best_cosines, delta_key_basis, inversion_curve, merged_delta, nearest_labels,
                           per_client_precision, precision_at_m, rank_labels, reidentify, row_space_basis,
                           subspace_reidentify, subspace_scores, top_eigenvectors)


def test_one_key_is_recovered_exactly_from_its_gram():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((20, 1))
    u = top_eigenvectors(k @ k.T, 1)
    assert abs(float(u[:, 0] @ k[:, 0]) / np.linalg.norm(k)) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_keys_are_recovered_and_the_gram_hides_only_a_rotation():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((30, 4)))
    keys = q * np.array([5.0, 4.0, 3.0, 2.0])  # orthogonal, distinct norms: eigenvectors = keys
    cos, best = best_cosines(top_eigenvectors(keys @ keys.T, 4), keys)
    np.testing.assert_allclose(cos, 1.0, atol=1e-10)
    assert sorted(best) == [0, 1, 2, 3]
    rotation, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    np.testing.assert_allclose((keys @ rotation) @ (keys @ rotation).T, keys @ keys.T, atol=1e-10)


def test_equal_norm_correlated_keys_are_mixed_by_the_eigenvectors():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(40)
    keys = np.stack([base + 0.3 * rng.standard_normal(40) for _ in range(6)], axis=1)
    cos, _ = best_cosines(top_eigenvectors(keys @ keys.T, 6), keys)
    assert cos.mean() < 0.99  # G cannot tell the keys apart: the top eigenvector is their mean


def test_reidentify_by_nearest_neighbour():
    rng = np.random.default_rng(3)
    dictionary = rng.standard_normal((25, 50))
    labels = [f"s{i}" for i in range(50)]
    assert nearest_labels(-dictionary[:, [7, 3]], dictionary, labels) == ["s7", "s3"]  # sign does not matter
    keys = dictionary[:, [7]] * 2.5
    assert reidentify(keys @ keys.T, keys, ["s7"], dictionary, labels) == pytest.approx((1.0, 1.0))
    assert reidentify(None, keys, ["s7"], dictionary, labels) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError):
        top_eigenvectors(np.zeros((3, 4)), 1)


def _anisotropic_world(seed: int, d: int = 64, n: int = 300, spread: float = 1e-4):
    """A regulariser ``A0 = lam C`` with eigenvalues over four decades and ``n`` dictionary keys drawn from ``C``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.logspace(0, np.log10(spread), d)
    cov = (q * eig) @ q.T
    dictionary = (q * np.sqrt(eig)) @ rng.standard_normal((d, n))
    return rng, 10.0 * cov, dictionary, [f"s{i}" for i in range(n)]


def test_delta_times_regulariser_has_rows_in_the_key_span_woodbury():
    rng, a0, dictionary, _ = _anisotropic_world(4)
    keys, residuals = dictionary[:, [3, 17, 40]], rng.standard_normal((20, 3))
    delta = merged_delta(residuals @ keys.T, keys @ keys.T, a0)
    np.testing.assert_allclose(delta @ (a0 + keys @ keys.T), residuals @ keys.T, rtol=1e-9, atol=1e-9)
    inner = np.eye(3) + keys.T @ np.linalg.solve(a0, keys)  # I + K^T A0^-1 K
    woodbury = np.linalg.solve(inner.T, residuals.T).T @ keys.T  # R (I + K^T A0^-1 K)^-1 K^T
    np.testing.assert_allclose(delta @ a0, woodbury, rtol=1e-7, atol=1e-9 * np.abs(woodbury).max())
    basis = delta_key_basis(delta, a0, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(subspace_scores(basis, keys), 1.0, atol=1e-8)  # every planted key is inside
    others = np.delete(dictionary, [3, 17, 40], axis=1)
    assert subspace_scores(basis, others).max() < 0.999


def test_planted_keys_are_reidentified_from_delta_alone_and_the_regulariser_matters():
    rng, a0, dictionary, labels = _anisotropic_world(5)
    chosen = [11, 57, 123, 200, 250]
    keys, residuals = dictionary[:, chosen], rng.standard_normal((20, 5))
    delta = merged_delta(residuals @ keys.T, keys @ keys.T, a0)
    subjects = [labels[i] for i in chosen]
    assert subspace_reidentify(delta_key_basis(delta, a0, 5), dictionary, labels, subjects) == 1.0
    assert subspace_reidentify(delta_key_basis(delta.astype(np.float32), a0, 5), dictionary, labels, subjects) == 1.0
    assert subspace_reidentify(top_eigenvectors(keys @ keys.T, 5), dictionary, labels, subjects) == 1.0
    # Delta's own row space is A0^-1 span(K): without the regulariser the planted keys are not inside it
    assert subspace_scores(row_space_basis(delta, 5), keys).max() < 0.99
    with pytest.raises(ValueError):
        delta_key_basis(delta, a0[:-1, :-1], 5)


def test_sums_reveal_the_union_but_not_which_client_edited_what():
    rng, a0, dictionary, labels = _anisotropic_world(6)
    n_clients, per_client = 10, 3
    picked = rng.choice(dictionary.shape[1], n_clients * per_client, replace=False)

    def sums(split):
        kkt = sum(dictionary[:, s] @ dictionary[:, s].T for s in split)
        rkt = sum(residual[:, s] @ dictionary[:, s].T for s in split)
        return kkt, rkt

    residual = rng.standard_normal((40, dictionary.shape[1]))  # each fact's own residual column
    clients = [picked[i * per_client:(i + 1) * per_client] for i in range(n_clients)]
    truth = [[labels[i] for i in s] for s in clients]
    # each client's own payload: the per-client attack finds exactly its subjects
    for s, subjects in zip(clients, truth):
        own = merged_delta(residual[:, s] @ dictionary[:, s].T, dictionary[:, s] @ dictionary[:, s].T, a0)
        assert subspace_reidentify(delta_key_basis(own, a0, per_client), dictionary, labels, subjects) == 1.0
    kkt, rkt = sums(clients)
    union = [labels[i] for i in picked]
    m = len(picked)
    assert subspace_reidentify(top_eigenvectors(kkt, m), dictionary, labels, union) == 1.0
    assert subspace_reidentify(delta_key_basis(merged_delta(rkt, kkt, a0), a0, m), dictionary, labels, union) == 1.0
    # per client from the sum: at chance (per_client / m = 1 / n_clients), not 1
    attack = per_client_precision(top_eigenvectors(kkt, m), dictionary, labels, truth)
    assert attack <= 0.35
    # another split of the same edits: the K K^T sum is identical, so is every server-side guess
    shuffled = rng.permutation(picked)
    other = [shuffled[i * per_client:(i + 1) * per_client] for i in range(n_clients)]
    for got, want in zip(sums(other), (kkt, rkt)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_rank_labels_and_precision_at_m():
    assert rank_labels(np.array([0.2, 0.9, 0.5, 0.95]), ["a", "b", "a", "c"]) == ["c", "b", "a"]
    assert precision_at_m(["c", "b", "a"], ["b", "c"]) == 1.0
    assert precision_at_m(["c", "b", "a"], ["a", "c"]) == 0.5
    assert precision_at_m(["c", "b", "a"], ["a"]) == 0.0
    with pytest.raises(ValueError):
        precision_at_m(["a"], [])


def test_world_curve_kkt_leaks_less_than_k(tiny_bed):
    editor = tiny_bed.editor(lam=30.0)
    curve = inversion_curve(tiny_bed.world, editor, (1, 8, 32), trials=2, seed=0)
    assert curve["M"] == [1, 8, 32] and curve["dictionary_size"] > len(tiny_bed.world.subjects)
    assert curve["cosine"][0] == pytest.approx(1.0, abs=1e-9)  # one edit: K K^T gives the key away
    assert curve["cosine_K"] == [1.0, 1.0, 1.0]
    for kkt, k in zip(curve["reid_top1"], curve["reid_top1_K"]):
        assert 0.0 <= kkt <= k <= 1.0
    assert curve["reid_top1"][-1] < curve["reid_top1"][0]
    assert curve["cosine"][-1] < curve["cosine"][0]


@pytest.mark.slow
def test_bench_quick_writes_exactly_the_issue_keys(tiny_bed, cache_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "privacy.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "privacy.py"
    env = {**os.environ, "FEDKE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], check=True, env=env,
                   capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert {k: set(v) for k, v in result.items()} == {
        "secagg": {"rel_error", "score_plain", "score_secagg", "seconds"},
        "bad_payloads": {"cases", "rejected", "model_unchanged"},
        "large_layers": {"bytes_per_client_round", "peak_rss_mb"},
        "kkt_inversion": {"M", "cosine", "reid_top1"},
        "attacks": {"model", "layer", "edits_per_client", "clients", "kkt_top1", "kkt_subspace_top1", "delta_top1",
                    "delta_naive_top1", "delta_true_min_score", "delta_other_max_score",
                    "delta_naive_true_min_score", "delta_naive_other_max_score", "pool_size", "pool_prompts",
                    "held_pool", "chance_top1", "chance_precision", "d_in", "d_out", "target_seconds", "seconds", "secagg_sum"},
    }
    assert result["secagg"]["rel_error"] < 1e-3
    assert abs(result["secagg"]["score_plain"] - result["secagg"]["score_secagg"]) <= 0.5
    assert result["bad_payloads"]["rejected"] == result["bad_payloads"]["cases"] >= 20
    assert result["bad_payloads"]["model_unchanged"] is True
    assert result["kkt_inversion"]["M"] == [1, 2, 4, 8, 16, 32]
    assert len(result["kkt_inversion"]["cosine"]) == len(result["kkt_inversion"]["reid_top1"]) == 6
    attacks = result["attacks"]
    assert attacks["edits_per_client"] == [1, 2, 5, 10]
    assert attacks["delta_top1"][0] == 1.0 and attacks["kkt_top1"][0] == 1.0  # one edit: both give it away
    assert attacks["chance_top1"] == pytest.approx(1.0 / attacks["pool_size"])
    assert attacks["secagg_sum"]["per_client_kkt_top1"] < 0.5 <= attacks["secagg_sum"]["union_kkt_top1"]

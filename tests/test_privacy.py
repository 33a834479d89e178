"""fedke.privacy: the K K^T inversion study (exact maths by hand, then the tiny world)."""

from __future__ import annotations

import numpy as np
import pytest

from fedke.privacy import best_cosines, inversion_curve, nearest_labels, reidentify, top_eigenvectors


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
    }
    assert result["secagg"]["rel_error"] < 1e-3
    assert abs(result["secagg"]["score_plain"] - result["secagg"]["score_secagg"]) <= 0.5
    assert result["bad_payloads"]["rejected"] == result["bad_payloads"]["cases"] >= 20
    assert result["bad_payloads"]["model_unchanged"] is True
    assert result["kkt_inversion"]["M"] == [1, 2, 4, 8, 16, 32]
    assert len(result["kkt_inversion"]["cosine"]) == len(result["kkt_inversion"]["reid_top1"]) == 6

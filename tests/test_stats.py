"""Covariance statistics: the maths, the cache (never recomputed, refused for another model), atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedke import stats
from fedke.stats import StatsError, compute_layer_stats, layer_covariances, load_layer_stats, model_fingerprint


def _layer(bed):
    return bed.editor().layer_names[0]


def test_covariance_is_the_mean_of_k_kt(tiny_bed):
    texts = list(tiny_bed.world.filler_text())[:10]
    name = _layer(tiny_bed)
    result = compute_layer_stats(tiny_bed.model, tiny_bed.tokenizer, [name], texts, batch_size=3, progress=False)[name]
    keys = []
    hook = tiny_bed.model.get_submodule(name).register_forward_pre_hook(lambda m, i: keys.append(i[0][0].double()))
    with torch.no_grad():
        for text in texts:
            tiny_bed.model(**tiny_bed.tokenizer(text, return_tensors="pt"))
    hook.remove()
    k = torch.cat(keys).numpy()
    assert result.count == k.shape[0]
    np.testing.assert_allclose(result.covariance, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)


def test_cached_statistics_are_never_recomputed(tiny_bed, tmp_path, monkeypatch):
    name = _layer(tiny_bed)
    texts = list(tiny_bed.world.filler_text())[:20]
    first = layer_covariances(tiny_bed.model, tiny_bed.tokenizer, [name], texts, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(stats, "compute_layer_stats", lambda *a, **k: pytest.fail("recomputed a cached layer"))
    again = layer_covariances(tiny_bed.model, tiny_bed.tokenizer, [name], texts, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first[name], again[name])
    path = next(tmp_path.rglob("*.safetensors"))
    loaded = load_layer_stats(path, model_fingerprint=model_fingerprint(tiny_bed.model), layer=name)
    assert loaded.count > 0 and loaded.layer == name


def test_statistics_of_another_model_are_refused(tiny_bed, tmp_path):
    name = _layer(tiny_bed)
    layer_covariances(tiny_bed.model, tiny_bed.tokenizer, [name], ["a b c"], cache_dir=tmp_path, progress=False)
    path = next(tmp_path.rglob("*.safetensors"))
    with pytest.raises(StatsError, match="computed for model"):
        load_layer_stats(path, model_fingerprint="not-this-model")
    with pytest.raises(StatsError, match="holds layer"):
        load_layer_stats(path, layer="transformer.h.0.mlp.c_proj")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(StatsError, match="cannot read"):
        load_layer_stats(garbage)


def test_failed_write_leaves_nothing_half_written(tiny_bed, tmp_path, monkeypatch):
    import os

    name = _layer(tiny_bed)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        layer_covariances(tiny_bed.model, tiny_bed.tokenizer, [name], ["a b c"], cache_dir=tmp_path, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_no_text_is_an_error(tiny_bed):
    with pytest.raises(ValueError, match="no text"):
        compute_layer_stats(tiny_bed.model, tiny_bed.tokenizer, [_layer(tiny_bed)], ["   "], progress=False)

"""AlphaEdit (issue 19): MEMIT's solve on keys projected onto C0's near-null space, with alpha I as
the regulariser. The projection's maths, its equality with the authors' closed form, and that
CollabEdit of AlphaEdit payloads is Global AlphaEdit."""

from __future__ import annotations

import numpy as np
import pytest

from fedke.merge import alphaedit_update, collab_edit_from_sums, global_edit, null_space_projector


def _covariance(rng, d=24, small=8):
    """An SPD matrix with ``small`` eigenvalues near 1e-3 and the rest between 1 and 10."""
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    values = np.concatenate([1e-3 * rng.uniform(0.5, 1.5, small), rng.uniform(1.0, 10.0, d - small)])
    return (basis * values) @ basis.T, basis[:, :small], basis[:, small:]


def test_the_projector_keeps_the_small_directions_and_removes_the_large_ones():
    rng = np.random.default_rng(0)
    cov, small, large = _covariance(rng)
    projector = null_space_projector(cov, threshold=0.01)
    np.testing.assert_allclose(projector, projector.T, atol=1e-12)
    np.testing.assert_allclose(projector @ projector, projector, atol=1e-10)
    np.testing.assert_allclose(projector @ small, small, atol=1e-10)
    np.testing.assert_allclose(projector @ large, 0.0, atol=1e-10)
    with pytest.raises(ValueError, match="raise the null-space threshold"):
        null_space_projector(cov, threshold=1e-6)
    with pytest.raises(ValueError, match="positive"):
        null_space_projector(cov, threshold=0.0)


def test_projected_memit_is_the_authors_closed_form_and_spares_the_kept_knowledge():
    rng = np.random.default_rng(1)
    cov, _, large = _covariance(rng)
    projector = null_space_projector(cov, threshold=0.01)
    keys, residuals = rng.standard_normal((24, 5)), rng.standard_normal((7, 5))
    earlier = rng.standard_normal((24, 6))
    alpha = 0.5
    authors = alphaedit_update(residuals, keys, projector, alpha, preserved=earlier @ earlier.T)
    projected, projected_earlier = projector @ keys, projector @ earlier
    ours = global_edit(residuals, projected, alpha * np.eye(24) + projected_earlier @ projected_earlier.T)
    np.testing.assert_allclose(ours, authors, rtol=1e-9, atol=1e-12)
    assert np.abs(ours @ large).max() < 1e-9 * np.abs(ours).max()  # the large directions see nothing


def test_alphaedit_editor_payloads_merge_into_global_alphaedit(tiny_bed):
    from fedke.editing.weights import applied_update
    from fedke.eval import evaluate_cases

    cases = tiny_bed.world.edit_cases(9, seed=4)
    requests = [case.request for case in cases]
    # the tiny world's keys carry less of C0's energy than SmolLM2's: a weaker alpha than the default
    editor = tiny_bed.editor(editor="alphaedit", nullspace_threshold=0.5, alphaedit_l2=0.1, mode="decoupled")
    assert set(editor.key_projectors) == set(editor.layer_names)
    regs = editor.regularisers()
    targets = editor.compute_targets(requests)
    whole, internals = editor.edit_with_internals(requests, targets=targets)
    parts = [editor.edit(requests[i:i + 3], targets=targets.subset(range(i, i + 3))) for i in (0, 3, 6)]
    for name, layer in whole.layers.items():
        projector = editor.key_projectors[name].cpu().numpy()
        np.testing.assert_allclose(layer.delta @ projector, layer.delta, atol=1e-8 * np.abs(layer.delta).max())
        scale = editor.config.alphaedit_l2 * np.trace(editor.covariances[name]) / projector.shape[0]
        np.testing.assert_allclose(regs[name], scale * np.eye(projector.shape[0]))
        merged = collab_edit_from_sums(sum(p.layers[name].rkt for p in parts), sum(p.layers[name].kkt for p in parts),
                                       regs[name])
        assert np.linalg.norm(merged - layer.delta) <= 1e-9 * np.linalg.norm(layer.delta)
    with applied_update(tiny_bed.model, whole.deltas()):
        edited = evaluate_cases(tiny_bed.model, tiny_bed.tokenizer, cases).summary
    unedited = evaluate_cases(tiny_bed.model, tiny_bed.tokenizer, cases).summary
    assert edited["ES"] > unedited["ES"]


def test_alphaedit_settings_are_checked():
    from fedke.editing import MemitConfig

    with pytest.raises(ValueError, match="editor must be"):
        MemitConfig(editor="rome")
    with pytest.raises(ValueError, match="nullspace_threshold"):
        MemitConfig(editor="alphaedit", nullspace_threshold=0.0)


def test_the_editor_key_reaches_the_editor_and_refuses_knowledge_weight():
    from fedke.simulations.scenario import ConfigError, Scenario

    scenario = Scenario.from_run_config({"model": "world", "editor": "alphaedit", "nullspace-threshold": 0.3})
    overrides = scenario.memit_overrides()
    assert (overrides["editor"], overrides["nullspace_threshold"]) == ("alphaedit", 0.3)
    with pytest.raises(ConfigError, match="editor must be one of"):
        Scenario.from_run_config({"model": "world", "editor": "malmen"})
    with pytest.raises(ConfigError, match="knowledge-weight"):
        Scenario.from_run_config({"model": "world", "editor": "alphaedit", "knowledge-weight": 0.01})


def test_the_editors_benchmark_writes_the_issue_keys_and_collabedit_equals_global_edit(cache_dir, tiny_bed, tmp_path,
                                                                                       load_bench):
    import json

    out = tmp_path / "editors.json"
    result = load_bench("editors").main(["--quick", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert json.loads(out.read_text()).keys() == result.keys() == {"editors"}
    assert set(result["editors"]) == {"memit", "alphaedit"}
    for row in result["editors"].values():
        assert set(row) == {"GlobalEdit", "CollabEdit", "TaskArithmetic", "rel_error_collab_vs_global",
                            "seconds_per_edit"}
        assert row["rel_error_collab_vs_global"] < 1e-5 and row["seconds_per_edit"] > 0  # float32 wire
        assert row["CollabEdit"]["ES"] == row["GlobalEdit"]["ES"]
        assert list(row["GlobalEdit"])[:4] == ["ES", "PS", "NS", "Score"]

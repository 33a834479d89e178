"""Knowledge overlap: the residual guard, the per-round residual distribution, the repeat study (eq. 6)."""

from __future__ import annotations

import numpy as np
import pytest

from fedke.data.records import EditCase, EditRequest
from fedke.overlap import guard_mask, guarded_edit, repeat_residuals
from fedke.payload import EditPayload, LayerPayload


class FakeEditor:
    """An editor whose residual norm per request is fixed by its subject; records every call."""

    layer_names = ["layer"]

    def __init__(self, norms: dict[str, float]) -> None:
        self.norms = norms
        self.calls: list[list[str]] = []

    def layer_shapes(self):
        return {"layer": (2, 3)}

    def regularisers(self):
        return {"layer": np.eye(3)}

    def edit(self, requests, *, regularisers=None):
        subjects = [r.subject for r in requests]
        self.calls.append(subjects)
        n = len(requests)
        delta = np.full((2, 3), float(n))
        return EditPayload({"layer": LayerPayload(delta, np.eye(3) * n, delta * 2)}, n_edits=n,
                           residual_norms=np.array([self.norms[s] for s in subjects]))


def requests(*subjects):
    return [EditRequest("{} lives in", s, "Kelmar", "P551", "Dusso", i) for i, s in enumerate(subjects)]


def test_guard_mask_skips_exactly_the_norms_below_the_threshold():
    norms = np.array([0.0, 0.099, 0.1, 0.1000001, 5.0])
    assert guard_mask(norms, 0.1).tolist() == [False, False, True, True, True]  # equal is kept
    assert guard_mask(norms, 0.0).all() and guard_mask(norms, None).all()
    with pytest.raises(ValueError, match="threshold"):
        guard_mask(norms, -1.0)
    with pytest.raises(ValueError, match="finite"):
        guard_mask([np.nan], 0.1)


def test_guarded_edit_edits_only_the_requests_above_the_threshold():
    editor = FakeEditor({"a": 0.0, "b": 2.0, "c": 0.05, "d": 1.0})
    result = guarded_edit(editor, requests("a", "b", "c", "d"), 0.5)
    assert editor.calls == [["a", "b", "c", "d"], ["b", "d"]]  # measure all, edit the kept ones alone
    assert result.keep.tolist() == [False, True, False, True] and result.n_skipped == 2
    assert result.payload.n_edits == 2 and result.payload.residual_norms.tolist() == [2.0, 1.0]
    assert result.metrics() == {"n_skipped": 2, "n_requested": 4, "skipped_residual_norm_max": 0.05}
    # nothing under the threshold: one call, the payload as is
    editor = FakeEditor({"b": 2.0, "d": 1.0})
    result = guarded_edit(editor, requests("b", "d"), 0.5)
    assert editor.calls == [["b", "d"]] and result.n_skipped == 0
    # everything under: an empty payload
    editor = FakeEditor({"a": 0.0})
    result = guarded_edit(editor, requests("a"), 0.5)
    assert result.payload.n_edits == 0 and not result.payload.layers["layer"].delta.any()


def test_client_reports_skipped_requests_and_the_strategy_sums_them():
    from fedke.codec import LayerSpec
    from fedke.simulations.client import EditClient
    from fedke.simulations.inprocess import LocalProxy, fit_result
    from fedke.strategies import CollabEdit

    def cases(*subjects):
        return [EditCase(r.case_id, r) for r in requests(*subjects)]

    editor = FakeEditor({"a": 0.0, "b": 2.0, "c": 0.01})
    guarded = EditClient(editor, None, None, {1: cases("a", "b", "c")}, residual_guard=0.1)
    unguarded = EditClient(editor, None, None, {1: cases("a", "b", "c")})
    with pytest.raises(ValueError, match="threshold"):
        EditClient(editor, None, None, {}, residual_guard=-1.0)
    arrays, n, metrics = guarded.fit([], {"server_round": 1})
    assert n == 1 and metrics["n_skipped"] == 2 and metrics["n_requested"] == 3
    arrays2, n2, metrics2 = unguarded.fit([], {"server_round": 1})
    assert n2 == 3 and "n_skipped" not in metrics2
    strategy = CollabEdit(layer_specs=[LayerSpec("layer", 2, 3)], regularisers={"layer": np.eye(3)})
    _, merged = strategy.aggregate_fit(1, [(LocalProxy("0"), fit_result(arrays, n, metrics)),
                                           (LocalProxy("1"), fit_result(arrays2, n2, metrics2))], [])
    assert merged["n_skipped"] == 2
    # the per-round residual distribution covers every edited request (1 + 3)
    norms = np.array([2.0, 0.0, 2.0, 0.01])
    assert merged["residual_norm_count"] == 4
    assert merged["residual_norm_min"] == pytest.approx(norms.min(), abs=1e-6)
    assert merged["residual_norm_p10"] == pytest.approx(np.percentile(norms, 10), rel=1e-5)
    assert merged["residual_norm_p90"] == pytest.approx(np.percentile(norms, 90), rel=1e-5)


def test_guard_on_a_real_editor_equals_editing_the_kept_requests_alone(tiny_bed):
    """After merging two requests, re-submitting them with two fresh ones: the guard drops exactly
    the requests under the threshold and the payload equals editing the others alone."""
    from fedke.editing import applied_update

    editor = tiny_bed.editor(lam=30.0)
    cases = tiny_bed.world.edit_cases(4, seed=11)
    old, fresh = [c.request for c in cases[:2]], [c.request for c in cases[2:]]
    update = None
    for _ in range(3):  # merge the old requests a few times: they go into the model
        with applied_update(tiny_bed.model, update or {}):
            payload = editor.edit(old)
        update = {k: (update or {}).get(k, 0) + v for k, v in payload.deltas().items()}
    with applied_update(tiny_bed.model, update):
        norms = editor.edit(old + fresh).residual_norms
        assert norms[:2].min() < norms[2:].min()  # a merged request has the smallest residual
        threshold = float(np.sort(norms)[1])  # the smallest norm is skipped, the rest kept
        result = guarded_edit(editor, old + fresh, threshold)
        kept = [r for r, n in zip(old + fresh, norms) if n >= threshold]
        alone = editor.edit(kept)
    assert result.keep.tolist() == (norms >= threshold).tolist() and result.n_skipped == 1
    for name, layer in alone.layers.items():
        np.testing.assert_allclose(result.payload.layers[name].delta, layer.delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["decoupled", "sequential"])
def test_repeat_study_residual_falls_as_the_same_edit_is_merged_again(tiny_bed, mode):
    from fedke.editing import applied_update
    from fedke.merge import residual_after_repeat

    editor = tiny_bed.editor(lam=30.0, mode=mode)
    requests_ = [c.request for c in tiny_bed.world.edit_cases(6, seed=12)]
    study = repeat_residuals(editor, tiny_bed.model, requests_, 4, reoptimised=False)
    norms = study.column("residual_norm")
    assert len(norms) == 5 and all(b < a for a, b in zip(norms, norms[1:]))
    assert norms[-1] < 0.5 * norms[0]
    # the eq. 6 column is fedke.merge.residual_after_repeat on the first edit's last layer
    targets = editor.compute_targets(requests_)
    residual = editor.target_residuals(requests_, targets)
    last = editor.layer_names[-1]
    expected = residual_after_repeat(residual.T, editor.keys(requests_)[last], editor.regularisers()[last], 4)
    np.testing.assert_allclose(study.column("residual_norm_eq6"), expected, rtol=1e-9)
    assert norms[0] == pytest.approx(float(np.linalg.norm(residual)), rel=1e-9)
    # repeat k is one more MEMIT pass with the targets fixed: two repeats = an edit with passes=2
    twice = tiny_bed.editor(lam=30.0, mode=mode, passes=2).edit(requests_, targets=targets).deltas()
    with applied_update(tiny_bed.model, twice):
        assert float(np.linalg.norm(editor.target_residuals(requests_, targets))) == pytest.approx(norms[2], rel=1e-4)
    with pytest.raises(ValueError, match="passes"):
        repeat_residuals(tiny_bed.editor(passes=2), tiny_bed.model, requests_, 1)


# ----------------------------------------------------------------------------- bench/overlap.py


def test_overlap_benchmark_sizes_and_scenario_per_model(load_bench):
    """``--model smollm2`` picks the real model (subject's last token, its settings file) and its own
    sizes; flags given win; the world stays the default."""
    module = load_bench("overlap")
    world = module.parse_args([])
    assert (world.model, world.edits, world.repeats, world.reoptimise_every) == ("world", 50, 15, 1)
    assert module.scenario_from_args(world).is_world
    real = module.parse_args(["--model", "smollm2", "--cache-dir", "/tmp/x", "--repeats", "13"])
    assert (real.edits, real.repeats, real.clients, real.rounds) == (10, 13, 2, 3)
    scenario = module.scenario_from_args(real)
    assert (scenario.model, scenario.is_world, scenario.cache_dir, scenario.strategy) == ("smollm2", False, "/tmp/x", "collabedit")
    assert scenario.memit_overrides()["fact_token"] == "subject_last" and scenario.settings.memit.layers == (4, 5, 6, 7, 8)
    # the server's per-client bound admits a guard-run client's fresh + repeated requests
    assert scenario.edits_per_client == real.others + real.overlap == 4
    assert module.scenario_from_args(module.parse_args(["--quick"])).edits_per_client == 8
    for bad in (["--model", "smollm2", "--quick"], ["--model-path", "/tmp"], ["--edits", "0"]):
        with pytest.raises(SystemExit):
            module.parse_args(bad)


def test_overlap_figure3_reoptimises_on_schedule(tiny_bed, load_bench):
    """The re-optimised residual is measured every N repeats and after the last (None in between;
    before any merge only for N = 1), and equals what repeat_residuals measures itself."""
    from fedke.simulations.scenario import Scenario

    module = load_bench("overlap")
    scenario = Scenario.from_preset("tiny", num_rounds=1)
    cases = tiny_bed.world.edit_cases(4, seed=12)
    curve = module.figure3(tiny_bed, scenario, cases, 3, reoptimise_every=2, mode="sequential")
    reoptimised = [row["residual_norm_reoptimised"] for row in curve["rows"]]
    assert [r is None for r in reoptimised] == [True, True, False, False]  # k = 2 and the last (3)
    every = module.figure3(tiny_bed, scenario, cases, 3, reoptimise_every=1, mode="sequential")
    assert all(row["residual_norm_reoptimised"] is not None for row in every["rows"])
    editor = tiny_bed.editor(**{**scenario.memit_overrides(), "mode": "sequential"})
    study = repeat_residuals(editor, tiny_bed.model, [c.request for c in cases], 3, reoptimised=True)
    expected = study.column("residual_norm_reoptimised")
    assert reoptimised[2:] == pytest.approx(expected[2:], rel=1e-6)
    assert every["rows"][0]["residual_norm_reoptimised"] == pytest.approx(expected[0], rel=1e-6)
    assert curve["residual_norm"] == pytest.approx(study.column("residual_norm")[1:], rel=1e-9)

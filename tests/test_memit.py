"""MEMIT editor: the maths, exact apply / revert, modes, presets of every family, bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedke import merge
from fedke.data.records import EditRequest, RecordError
from fedke.editing import LayerError, MemitConfig, MemitEditor, applied_update, apply_update, revert_update, preset_for
from fedke.editing.presets import LayerPreset


def _requests(bed, n, offset=0):
    return [c.request for c in bed.world.edit_cases(n + offset)[offset:]]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_delta_times_keys_reproduces_residuals_when_lam_c_is_negligible(tiny_bed):
    editor = tiny_bed.editor(lam=1e-9, mode="decoupled")
    payload, internals = editor.edit_with_internals(_requests(tiny_bed, 6))
    for name, layer in payload.layers.items():
        keys, residuals = internals.keys[name], internals.residuals[name]
        np.testing.assert_allclose(layer.delta @ keys, residuals, rtol=1e-5, atol=1e-6 * np.abs(residuals).max())
        np.testing.assert_allclose(layer.kkt, keys @ keys.T)
        np.testing.assert_allclose(layer.rkt, residuals @ keys.T)


def test_payload_satisfies_normal_equations(tiny_bed):
    editor = tiny_bed.editor()
    payload = editor.edit(_requests(tiny_bed, 5))
    regs = editor.regularisers()
    for name, layer in payload.layers.items():
        np.testing.assert_allclose(layer.delta @ (regs[name] + layer.kkt), layer.rkt, rtol=1e-8,
                                   atol=1e-9 * np.abs(layer.rkt).max())
    assert payload.n_edits == 5 and payload.residual_norms.shape == (5,)


def test_edit_leaves_model_unchanged_and_apply_revert_is_exact(tiny_bed):
    model = tiny_bed.model
    before = _state(model)
    for mode in ("decoupled", "sequential"):
        payload = tiny_bed.editor(mode=mode).edit(_requests(tiny_bed, 4))
        after_edit = _state(model)
        assert all(torch.equal(before[k], after_edit[k]) for k in before)
        record = apply_update(model, payload.deltas())
        changed = _state(model)
        assert any(not torch.equal(before[k], changed[k]) for k in before)
        revert_update(model, record)
        assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_edits_take_effect(tiny_bed):
    from fedke.eval import evaluate_cases

    cases = tiny_bed.world.edit_cases(20)
    before = evaluate_cases(tiny_bed.model, tiny_bed.tokenizer, cases).summary
    payload = tiny_bed.editor(lam=30.0).edit([c.request for c in cases])
    with applied_update(tiny_bed.model, payload.deltas()):
        after = evaluate_cases(tiny_bed.model, tiny_bed.tokenizer, cases).summary
    # the tiny 3-layer, 64-wide model is a weak editor (ES 75-85 over lambda 3..100 on these
    # 20 cases); bench/edit.py measures the default world model
    assert before["ES"] <= 10
    assert after["ES"] >= 70 and after["PS"] > before["PS"] + 50


def test_decoupled_collab_merge_equals_global_edit(tiny_bed):
    editor = tiny_bed.editor(mode="decoupled")
    requests = _requests(tiny_bed, 12)
    global_payload = editor.edit(requests)
    clients = [editor.edit(requests[i::3]) for i in range(3)]
    # targets and keys of a request do not depend on its batch mates, so the merge is exact
    regs = editor.regularisers()
    for name in editor.layer_names:
        merged = merge.collab_edit([c.layers[name].delta for c in clients], [c.layers[name].kkt for c in clients], regs[name])
        reference = global_payload.layers[name].delta
        assert np.linalg.norm(merged - reference) / np.linalg.norm(reference) < 1e-9


def test_batched_targets_do_not_depend_on_batch_mates(tiny_bed):
    editor = tiny_bed.editor(v_num_grad_steps=10, loss_stop=0.0)
    requests = _requests(tiny_bed, 4)
    together = editor.edit_with_internals(requests)[1].targets
    alone = editor.edit_with_internals(requests[:1])[1].targets
    np.testing.assert_array_equal(together[0], alone[0])


def test_precomputed_targets_give_the_same_payload_and_are_checked(tiny_bed):
    editor = tiny_bed.editor(v_num_grad_steps=8)
    requests = _requests(tiny_bed, 4)
    targets = editor.compute_targets(requests)
    plain = editor.edit(requests)
    for lam in (editor.config.lam, 3 * editor.config.lam):
        other = tiny_bed.editor(v_num_grad_steps=8, lam=lam)
        reused = other.edit(requests, targets=targets)
        fresh = other.edit(requests) if lam != editor.config.lam else plain
        for name in fresh.layers:
            np.testing.assert_array_equal(reused.layers[name].delta, fresh.layers[name].delta)
    with pytest.raises(ValueError, match="other requests"):
        editor.edit(requests[:3], targets=targets)
    with pytest.raises(ValueError, match="other target settings"):
        tiny_bed.editor(v_num_grad_steps=9).edit(requests, targets=targets)


def test_a_subset_of_targets_edits_like_targets_computed_for_that_subset(tiny_bed):
    editor = tiny_bed.editor(v_num_grad_steps=8)
    requests = _requests(tiny_bed, 4)
    targets = editor.compute_targets(requests)
    picked = [3, 1]
    subset = targets.subset(picked)
    chosen = [requests[i] for i in picked]
    fresh = editor.edit(chosen)
    reused = editor.edit(chosen, targets=subset)
    for name in fresh.layers:
        np.testing.assert_allclose(reused.layers[name].delta, fresh.layers[name].delta, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="other requests"):
        editor.edit(requests[:2], targets=subset)
    with pytest.raises(IndexError, match="0..3"):
        targets.subset([4])


def test_sequential_differs_from_decoupled(tiny_bed):
    requests = _requests(tiny_bed, 5)
    a = tiny_bed.editor(mode="decoupled").edit(requests)
    b = tiny_bed.editor(mode="sequential").edit(requests)
    first = tiny_bed.editor().layer_names[0]
    last = tiny_bed.editor().layer_names[-1]
    np.testing.assert_allclose(a.layers[first].delta, b.layers[first].delta, rtol=1e-6, atol=1e-9)
    assert not np.allclose(a.layers[last].delta, b.layers[last].delta)


def test_residual_split_even_vs_remaining(tiny_bed):
    requests = _requests(tiny_bed, 3)
    _, remaining = tiny_bed.editor(residual_split="remaining").edit_with_internals(requests)
    _, even = tiny_bed.editor(residual_split="even").edit_with_internals(requests)
    names = list(even.residuals)
    n = len(names)
    np.testing.assert_allclose(remaining.residuals[names[0]], even.residuals[names[0]])
    np.testing.assert_allclose(remaining.residuals[names[-1]], n * even.residuals[names[-1]])


def test_dynamic_regulariser_override(tiny_bed):
    editor = tiny_bed.editor()
    requests = _requests(tiny_bed, 3)
    name = editor.layer_names[0]
    doubled = {name: 2 * editor.regularisers()[name]}
    a = editor.edit(requests)
    b = editor.edit(requests, regularisers=doubled)
    np.testing.assert_allclose(b.layers[name].delta @ (doubled[name] + b.layers[name].kkt), b.layers[name].rkt,
                               rtol=1e-8, atol=1e-9 * np.abs(b.layers[name].rkt).max())
    assert np.linalg.norm(b.layers[name].delta) < np.linalg.norm(a.layers[name].delta)


def test_a_regulariser_that_is_not_positive_definite_is_refused_naming_the_layer(tiny_bed):
    """No silent fallback to a general solve (issue 21 item 9): the error names the layer."""
    editor = tiny_bed.editor()
    name = editor.layer_names[-1]
    negative = {name: -editor.regularisers()[name]}
    with pytest.raises(merge.SingularSystemError, match=repr(name)):
        editor.edit(_requests(tiny_bed, 3), regularisers=negative)


@pytest.mark.parametrize("mode", ["decoupled", "sequential"])
def test_passes_repeat_the_edit_with_fixed_targets_on_the_edited_model(tiny_bed, mode):
    requests = _requests(tiny_bed, 6)
    one = tiny_bed.editor(mode=mode)
    targets = one.compute_targets(requests)
    first = one.edit(requests, targets=targets)
    with applied_update(tiny_bed.model, first.deltas()):  # pass 2 = the same edit on the edited model
        second = one.edit(requests, targets=targets)
    two_editor = tiny_bed.editor(mode=mode, passes=2)
    two, internals = two_editor.edit_with_internals(requests, targets=targets)
    regs = two_editor.regularisers()
    for name, layer in two.layers.items():
        expected = first.layers[name].delta + second.layers[name].delta
        np.testing.assert_allclose(layer.delta, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        np.testing.assert_allclose(layer.kkt, first.layers[name].kkt)  # the first pass's keys
        np.testing.assert_allclose(layer.delta @ (regs[name] + layer.kkt), layer.rkt, rtol=1e-8,
                                   atol=1e-9 * np.abs(layer.rkt).max())
        np.testing.assert_allclose(internals.keys[name] @ internals.keys[name].T, first.layers[name].kkt)
    # a second pass brings the edited model's outputs closer to the targets
    def residual(update):
        with applied_update(tiny_bed.model, update):
            _, current = one._keys_and_outputs(requests)
        return float((targets.z - current).norm())

    assert residual(two.deltas()) < residual(first.deltas())


# ---------------------------------------------------------------------- bad input
def test_subject_not_in_prompt():
    with pytest.raises(RecordError, match="placeholder"):
        EditRequest(prompt="Paris is in", subject="Paris", target_new="Italy", case_id=7)


def test_empty_and_unknown_targets(tiny_bed):
    with pytest.raises(RecordError, match="empty target_new"):
        EditRequest("{} lives in", "Ada", "  ", case_id=1)
    subject = tiny_bed.world.subjects[0]
    with pytest.raises(RecordError, match="unknown to the tokenizer"):
        tiny_bed.editor().edit([EditRequest("{} lives in", subject, "Atlantisxyz", case_id=3)])


def test_layer_not_in_model(tiny_bed):
    with pytest.raises(LayerError, match=r"transformer\.h\.9"):
        preset_for(tiny_bed.model, layers=(9,))


def test_missing_covariance(tiny_bed):
    with pytest.raises(ValueError, match="no covariance"):
        MemitEditor(tiny_bed.model, tiny_bed.tokenizer, {}, tiny_bed.memit_config)


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        MemitConfig(mode="parallel")
    with pytest.raises(ValueError, match="fact_token"):
        MemitConfig(fact_token="first")
    for passes in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="passes"):
            MemitConfig(passes=passes)


# ---------------------------------------------------------------------- families
def _tiny_model(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **common))
    if family == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(n_layer=3, n_embd=32, n_head=4, rotary_dim=8, n_positions=64, **common))
    config_class, model_class = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    config = config_class(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
    return model_class(config)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
def test_presets_on_tiny_random_models(tiny_bed, family, fact_token):
    torch.manual_seed(0)
    tokenizer = tiny_bed.tokenizer
    model = _tiny_model(family, len(tokenizer)).eval()
    preset = preset_for(model, layers=(1, 2))
    assert preset.family == family
    rng = np.random.default_rng(0)
    covariances = {}
    for layer in preset.layers:
        name = preset.mlp_out_name(layer)
        d_in = dict(model.named_modules())[name].weight.shape[0 if family == "gpt2" else 1]
        a = rng.standard_normal((d_in, d_in))
        covariances[name] = a @ a.T / d_in + np.eye(d_in)
    config = replace(tiny_bed.memit_config, layers=(1, 2), fact_token=fact_token, lam=1.0, v_num_grad_steps=4)
    editor = MemitEditor(model, tokenizer, covariances, config, preset)
    before = _state(model)
    payload = editor.edit(_requests(tiny_bed, 3))
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    for name, layer in payload.layers.items():
        d_out, d_in = editor.layer_shapes()[name]
        assert layer.delta.shape == (d_out, d_in) and layer.kkt.shape == (d_in, d_in)
        assert np.isfinite(layer.delta).all() and np.abs(layer.delta).max() > 0
    with applied_update(model, payload.deltas()):
        pass
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_subject_last_lookup_points_at_subject(tiny_bed):
    editor = tiny_bed.editor(fact_token="subject_last")
    tokenizer = tiny_bed.tokenizer
    subject = next(s for s in tiny_bed.world.subjects if len(s.split()) == 2)
    template = "The home town of {} is"
    ids = tokenizer(template.format(subject))["input_ids"]
    index = editor._lookup_index(template, subject, len(ids))
    assert tokenizer.convert_ids_to_tokens(ids[index]) == subject.split()[-1]
    assert tiny_bed.editor(fact_token="last")._lookup_index(template, subject, len(ids)) == len(ids) - 1

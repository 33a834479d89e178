"""MEMIT as the reference code computes it (issue 24): key weighting, KL direction, early stop, and
the fast target optimisation (upper blocks only, LM head at the loss positions, finished requests
leave the batch) against a one-request-at-a-time loop written after the reference's ``compute_z``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedke.editing import MemitConfig
from fedke.editing.reference import single_request_targets


def _requests(bed, n, offset=0):
    return [c.request for c in bed.world.edit_cases(n + offset)[offset:]]


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_batched_targets_equal_the_reference_one_request_loop(tiny_bed):
    """Same inputs, same algorithm: the batch shares passes but each request keeps its own loss,
    early stop and Adam trajectory, so the targets agree to float32 rounding."""
    editor = tiny_bed.editor()
    requests = _requests(tiny_bed, 6)
    batched = editor.compute_targets(requests)
    single = single_request_targets(editor, requests)
    assert _rel(batched.h_init, single.h_init) < 1e-6
    assert _rel(batched.z - batched.h_init, single.z - single.h_init) < 1e-5
    assert batched.steps == single.steps  # every request stops at the same pass


def test_requests_that_finish_early_leave_the_batch_without_changing_anyone_else(tiny_bed):
    """A loose stop makes requests finish at different steps (they leave the batch); each target
    still equals the request optimised alone."""
    editor = tiny_bed.editor(loss_stop=1.5)
    requests = _requests(tiny_bed, 8, offset=6)
    batched = editor.compute_targets(requests)
    for j, request in enumerate(requests[:3]):
        alone = editor.compute_targets([request])
        assert _rel(batched.z[j] - batched.h_init[j], alone.z[0] - alone.h_init[0]) < 1e-5
    single = single_request_targets(editor, requests)
    assert _rel(batched.z - batched.h_init, single.z - single.h_init) < 1e-5
    assert batched.steps == single.steps  # every request stops at the same pass


def test_the_suffix_and_upper_replays_equal_the_whole_model(tiny_bed):
    requests = _requests(tiny_bed, 5)
    whole = tiny_bed.editor(target_forward="full").compute_targets(requests)
    for mode in ("suffix", "upper"):
        replay = tiny_bed.editor(target_forward=mode).compute_targets(requests)
        assert _rel(replay.z - replay.h_init, whole.z - whole.h_init) < 1e-4


def test_target_batches_do_not_change_the_targets(tiny_bed):
    requests = _requests(tiny_bed, 7)
    one = tiny_bed.editor(target_batch=64).compute_targets(requests)
    three = tiny_bed.editor(target_batch=3).compute_targets(requests)
    assert _rel(one.z - one.h_init, three.z - three.h_init) < 1e-5


def test_keys_weigh_the_plain_prompt_half_as_the_reference_groups_contexts(tiny_bed):
    editor = tiny_bed.editor()
    weights = editor.context_weights()
    n = len(editor.context_templates()) - 1
    assert editor.context_templates()[0] == "{}" and n > 0
    assert weights == pytest.approx((0.5,) + (0.5 / n,) * n)
    assert tiny_bed.editor(key_weighting="uniform").context_weights() == pytest.approx((1 / (n + 1),) * (n + 1))
    requests = _requests(tiny_bed, 3)
    grouped = editor.keys(requests)
    uniform = tiny_bed.editor(key_weighting="uniform").keys(requests)
    name = editor.layer_names[0]
    assert _rel(grouped[name], uniform[name]) > 1e-3  # the weighting reaches the keys


def test_kl_direction_and_early_stop_are_named_settings_that_change_the_targets(tiny_bed):
    requests = _requests(tiny_bed, 4)
    base = tiny_bed.editor().compute_targets(requests)
    other = tiny_bed.editor(kl_direction="initial||edited").compute_targets(requests)
    assert _rel(other.z - other.h_init, base.z - base.h_init) > 1e-6
    # the NLL alone falls below the threshold before the whole loss does: fewer passes
    by_loss = tiny_bed.editor(loss_stop=1.0).compute_targets(requests)
    by_nll = tiny_bed.editor(loss_stop=1.0, early_stop="nll").compute_targets(requests)
    assert all(a <= b for a, b in zip(by_nll.steps, by_loss.steps)) and sum(by_nll.steps) < sum(by_loss.steps)
    assert MemitConfig().kl_direction == "edited||initial" and MemitConfig().early_stop == "loss"
    assert MemitConfig().key_weighting == "grouped"


@pytest.mark.parametrize("key, value", [("early_stop", "never"), ("kl_direction", "forward"),
                                        ("key_weighting", "even"), ("target_forward", "half"),
                                        ("target_batch", 0), ("target_batch", True), ("batch_invariant", 1)])
def test_bad_settings_are_refused_naming_them(key, value):
    with pytest.raises(ValueError, match=key):
        MemitConfig(**{key: value})


def test_targets_of_a_different_kl_direction_are_not_reused(tiny_bed):
    requests = _requests(tiny_bed, 2)
    targets = tiny_bed.editor().compute_targets(requests)
    with pytest.raises(ValueError, match="other target settings"):
        tiny_bed.editor(kl_direction="initial||edited").edit(requests, targets=targets)


def test_reference_loop_targets_edit_like_fedkes(tiny_bed):
    editor = tiny_bed.editor()
    requests = _requests(tiny_bed, 4)
    payload = editor.edit(requests, targets=single_request_targets(editor, requests))
    direct = editor.edit(requests)
    for name, layer in direct.layers.items():
        assert _rel(payload.layers[name].delta, layer.delta) < 1e-3
    assert torch.is_tensor(editor.compute_targets(requests).z)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama", "qwen2", "mistral"])
def test_the_upper_replay_runs_and_matches_the_whole_model_on_every_family(tiny_bed, family, caplog):
    """Edit layer 0 of a 3-block random model, so two blocks sit above the injection point."""
    from dataclasses import replace

    from fedke.editing import MemitEditor, preset_for
    from test_memit import _tiny_model

    torch.manual_seed(0)
    model = _tiny_model(family, len(tiny_bed.tokenizer)).eval()
    preset = preset_for(model, layers=(0,))
    name = preset.mlp_out_name(0)
    d_in = dict(model.named_modules())[name].weight.shape[0 if family == "gpt2" else 1]
    covariances = {name: np.eye(d_in)}
    requests = _requests(tiny_bed, 4)
    targets = {}
    for mode in ("suffix", "upper", "full"):
        config = replace(tiny_bed.memit_config, layers=(0,), fact_token="subject_last", v_num_grad_steps=6,
                         target_forward=mode)
        with caplog.at_level("WARNING", logger="fedke.editing.memit"):
            targets[mode] = MemitEditor(model, tiny_bed.tokenizer, covariances, config, preset).compute_targets(requests)
    assert "cannot use" not in caplog.text and "runs the whole model" not in caplog.text  # no fallback
    full = targets["full"]
    for replay in (targets["suffix"], targets["upper"]):
        assert _rel(replay.z - replay.h_init, full.z - full.h_init) < 1e-4


def test_keys_and_targets_do_not_depend_on_batch_mates_of_other_lengths(tiny_bed):
    """Rows run in groups of their own width (with fillers keeping matrix products tall): a batch
    mate with prompts longer than 32 tokens changes no other request's keys or targets, bit for bit."""
    from dataclasses import replace as replace_request

    requests = _requests(tiny_bed, 4)
    long = replace_request(requests[1], prompt="In other words , " * 8 + requests[1].prompt)
    batch = [requests[0], long, requests[2], requests[3]]
    editor = tiny_bed.editor(v_num_grad_steps=5)
    together_keys = editor.keys(batch)
    together = editor.compute_targets(batch)
    for j in (0, 2):
        alone_keys = editor.keys([batch[j]])
        for name, keys in together_keys.items():
            np.testing.assert_array_equal(keys[:, j], alone_keys[name][:, 0])
        alone = editor.compute_targets([batch[j]])
        np.testing.assert_array_equal(together.z[j].numpy(), alone.z[0].numpy())


def test_fixed_shape_chunks_cover_every_row_once_at_one_shape_per_width():
    from fedke.editing.target_forward import _width_groups

    lengths = torch.tensor([3, 9, 9, 17, 4, 12, 16, 9] * 7)
    mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
    for chunk_tokens in (0, 64):
        groups = _width_groups(mask, chunk_tokens)
        members = torch.cat([m for m, _, _ in groups])
        assert sorted(members.tolist()) == list(range(len(lengths)))
        for part, width, padded in groups:
            assert bool((-(-lengths[part] // 8) * 8 == width).all())
            assert padded[: len(part)].tolist() == part.tolist()
            if chunk_tokens:
                assert len(padded) == -(-chunk_tokens // width)  # the chunk's shape depends on its width only
            else:
                assert len(padded) * width >= 32


def test_batch_invariant_targets_are_bit_identical_alone_and_among_many(tiny_bed):
    """Enough requests that a width spans several chunks: a request's keys and targets are the
    same bits wherever it lands."""
    requests = _requests(tiny_bed, 24)
    editor = tiny_bed.editor(batch_invariant=True, v_num_grad_steps=3)
    together_keys, together = editor.keys(requests), editor.compute_targets(requests)
    for j in (0, 13, 23):
        alone_keys = editor.keys([requests[j]])
        for name, keys in together_keys.items():
            np.testing.assert_array_equal(keys[:, j], alone_keys[name][:, 0])
        np.testing.assert_array_equal(together.z[j].numpy(), editor.compute_targets([requests[j]]).z[0].numpy())

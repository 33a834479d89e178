"""Layer-wise CollabEdit equals sequential Global-Edit; one-shot CollabEdit of sequential payloads does not."""

from __future__ import annotations

import numpy as np
import pytest

from fedke import merge
from fedke.layerwise import layerwise_collab_edit


def _relative(update, reference):
    num = sum(np.linalg.norm(update[k] - reference[k]) ** 2 for k in reference)
    return float(np.sqrt(num / sum(np.linalg.norm(reference[k]) ** 2 for k in reference)))


def test_layerwise_collab_equals_sequential_global_edit(tiny_bed):
    editor = tiny_bed.editor(mode="sequential", v_num_grad_steps=10)
    requests = [c.request for c in tiny_bed.world.edit_cases(9, seed=3)]
    clients = [requests[:4], requests[4:7], requests[7:]]
    before = {k: v.clone() for k, v in tiny_bed.model.state_dict().items()}
    global_update = editor.edit(requests).deltas()
    layerwise = layerwise_collab_edit(editor, clients)
    assert _relative(layerwise, global_update) < 1e-8
    # the paper's one-shot merge of the clients' own sequential payloads is only approximate
    payloads = [editor.edit(c) for c in clients]
    one_shot = {name: merge.collab_edit_from_sums(sum(p.layers[name].rkt for p in payloads),
                                                  sum(p.layers[name].kkt for p in payloads),
                                                  editor.regularisers()[name])
                for name in editor.layer_names}
    assert _relative(one_shot, global_update) > 1e-4
    for key, value in tiny_bed.model.state_dict().items():  # the shared model is left as it was
        assert bool((value == before[key]).all()), key


def test_layerwise_from_a_base_update_and_bad_input(tiny_bed):
    editor = tiny_bed.editor(mode="sequential", v_num_grad_steps=5)
    requests = [c.request for c in tiny_bed.world.edit_cases(6, seed=4)]
    base = layerwise_collab_edit(editor, [requests[:2]])
    from fedke.editing import applied_update

    with applied_update(tiny_bed.model, base):
        expected = editor.edit(requests[2:]).deltas()
    got = layerwise_collab_edit(editor, [requests[2:4], requests[4:]], base_update=base)
    # float32 weights: (W + base) + Delta_1 there, W + (base + Delta_1) here
    assert _relative(got, expected) < 1e-6
    with pytest.raises(ValueError, match="no client"):
        layerwise_collab_edit(editor, [[], []])
    targets = editor.compute_targets(requests[:2])
    with pytest.raises(ValueError, match="layer_index"):
        editor.layer_payload(requests[:2], targets, 7)
    with pytest.raises(ValueError, match="other requests"):
        editor.layer_payload(requests[:3], targets, 0)

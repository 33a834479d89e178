from __future__ import annotations

import json

import pytest

from fedke.data.records import case_from_counterfact
from fedke.data.world import WorldConfig, make_world


def test_same_seed_same_world_byte_for_byte():
    config = WorldConfig(n_subjects=200, n_relations=4, seed=11)
    assert make_world(config).to_json() == make_world(config).to_json()
    assert make_world(config).to_json() != make_world(WorldConfig(n_subjects=200, n_relations=4, seed=12)).to_json()


def test_world_shape_and_subject_token_spans():
    world = make_world(WorldConfig(n_subjects=300, n_relations=4, seed=1))
    assert len(world.subjects) == len(set(world.subjects)) == 300
    spans = {len(s.split()) for s in world.subjects}
    assert spans == {1, 2, 3}
    assert len(world.facts) == 300 * 4
    for relation in world.relations:
        assert len(relation.templates) >= 4 and all("{}" in t for t in relation.templates)
        assert len(set(relation.objects)) == len(relation.objects)


def test_heldout_pairs_are_per_subject_and_template():
    world = make_world(WorldConfig(n_subjects=200, n_relations=3, seed=2))
    train = set(world.training_examples())
    held = world.heldout_examples()
    assert held and not (set(held) & train)
    # every template is trained with some subject: held-out pairs are not whole templates
    for relation in world.relations:
        for template in relation.templates:
            assert any(p.startswith(template.split("{}")[0]) and p.endswith(template.split("{}")[1])
                       for p, _ in train)
    # filler text never states a held-out pair
    held_prompts = {p for p, _ in held}
    assert not any(sentence.rsplit(" ", 2)[0] in held_prompts for sentence in world.filler)


def test_edit_cases_are_counterfactual_and_counterfact_schema():
    world = make_world(WorldConfig(n_subjects=150, n_relations=3, seed=5))
    cases = world.edit_cases(60)
    assert len({(c.subject, c.relation_id) for c in cases}) == 60
    for case in cases:
        request = case.request
        assert request.target_new != request.target_true == world.facts[case.subject, case.relation_id]
        assert request.subject in request.text
        assert all(case.subject in p for p in case.paraphrase_prompts)
        assert all(case.subject not in p for p in case.neighborhood_prompts)
        for prompt in case.neighborhood_prompts:
            neighbour = max((s for s in world.subjects if s in prompt), key=len)
            assert world.facts[neighbour, case.relation_id] == request.target_true
        record = json.loads(json.dumps(case.to_counterfact()))
        again = case_from_counterfact(record)
        assert again.request == request and again.paraphrase_prompts == case.paraphrase_prompts


def test_edit_cases_exclude_and_exhaustion():
    world = make_world(WorldConfig(n_subjects=20, n_relations=2, seed=0))
    first = world.edit_cases(10)
    rest = world.edit_cases(exclude=[(c.subject, c.relation_id) for c in first])
    assert len(rest) == 30
    assert not {(c.subject, c.relation_id) for c in first} & {(c.subject, c.relation_id) for c in rest}
    with pytest.raises(ValueError, match="free"):
        world.edit_cases(41)


def test_bad_world_config():
    with pytest.raises(ValueError, match="n_relations"):
        WorldConfig(n_relations=99)

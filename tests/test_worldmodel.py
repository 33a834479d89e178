"""World model: tokenizer, deterministic training, caching with save/load symmetry."""

from __future__ import annotations

import json

import torch

from fedke.data.world import WorldConfig, make_world
from fedke.worldmodel import WorldModelConfig, build_tokenizer, cache_key, load_world_model

MICRO_WORLD = WorldConfig(n_subjects=30, n_relations=2, n_filler=40, seed=4)
MICRO_MODEL = WorldModelConfig(n_layer=1, n_embd=32, n_head=2, max_epochs=3, warmup_steps=5)


def test_tokenizer_is_word_level_with_bos_and_space_insensitive_targets():
    world = make_world(MICRO_WORLD)
    tokenizer = build_tokenizer(world.vocabulary())
    subject = next(s for s in world.subjects if len(s.split()) == 2)
    ids = tokenizer(f"{subject} lives in")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + 2 + 2
    obj = world.relations[0].objects[0]
    assert tokenizer(" " + obj, add_special_tokens=False)["input_ids"] == tokenizer(obj, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in tokenizer(" ".join(world.vocabulary()))["input_ids"]


def test_same_seed_same_model_and_cache_roundtrip(tmp_path):
    first = load_world_model(MICRO_WORLD, MICRO_MODEL, cache_dir=tmp_path / "a", progress=False)
    second = load_world_model(MICRO_WORLD, MICRO_MODEL, cache_dir=tmp_path / "b", progress=False)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.path.name == cache_key(MICRO_WORLD, MICRO_MODEL)
    # the cache directory is a plain HF model + tokenizer directory, plus the world and the report
    files = {p.name for p in first.path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "world.json", "training.json"} <= files
    assert json.loads((first.path / "world.json").read_text())["config"]["seed"] == MICRO_WORLD.seed
    again = load_world_model(MICRO_WORLD, MICRO_MODEL, cache_dir=tmp_path / "a", progress=False)
    assert again.report == first.report  # loaded, not retrained
    assert not [p for p in (tmp_path / "a" / "world-models").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_tiny_world_model_knows_its_facts(tiny_bed):
    report = tiny_bed.world_model.report
    assert report["train_acc"] >= 97 and report["heldout_acc"] >= 90

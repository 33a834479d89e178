"""Shared fixtures: a tiny world and its world model, built once per test session in a temp cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedke.data.world import WorldConfig
from fedke.worldmodel import WorldModelConfig

# The same world and model as the simulation preset "tiny" (fedke/simulations/presets/tiny.toml),
# so simulation tests reuse the model the other tests trained.
TINY_WORLD = WorldConfig(n_subjects=120, n_relations=3, seed=0)
TINY_MODEL = WorldModelConfig(n_layer=3, n_embd=64, n_head=2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A fresh cache per session; set FEDKE_TEST_CACHE to reuse one across sessions while developing."""
    reuse = os.environ.get("FEDKE_TEST_CACHE")
    path = Path(reuse) if reuse else tmp_path_factory.mktemp("fedke-cache")
    path.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("FEDKE_CACHE")
    os.environ["FEDKE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FEDKE_CACHE", None)
    else:
        os.environ["FEDKE_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_bed(cache_dir):
    from fedke.testbed import load_testbed

    return load_testbed(TINY_WORLD, TINY_MODEL, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench("forgetting")``: a script of ``bench/`` imported as a module (its ``main(argv)``)."""
    import importlib.util

    bench_dir = Path(__file__).parents[1] / "bench"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

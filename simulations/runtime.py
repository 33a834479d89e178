"""What a simulation process loads once and reuses across rounds and clients.

Flower's simulation engine runs many ``client_fn`` calls in one worker process (a Ray actor);
loading the model for each would dominate the run. The caches here hold the *read-only*
testbed (model, tokenizer, facts, covariance statistics) per process. Clients never change the cached
model for longer than one call: they apply the global update, edit or evaluate, and restore
the weights bit for bit (:func:`fedke.editing.applied_update`), so no client sees another's
state. Editors, strategies and clients themselves hold no module-level state.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import replace
from pathlib import Path

from fedke.data.records import EditCase
from fedke.data.world import WorldConfig
from fedke.editing.hparams import EditingSettings
from fedke.testbed import Testbed, load_real_testbed, load_testbed
from fedke.worldmodel import WorldModelConfig

from .dealing import deal_cases
from .scenario import Scenario


#: Whether a load that ``testbed_for`` triggers shows progress bars. A context variable rather than a
#: cache key, so that the ServerApp (progress on) and the in-process clients (progress off) share
#: one testbed per process instead of loading the model twice.
_show_progress: contextvars.ContextVar[bool] = contextvars.ContextVar("fedke_testbed_progress", default=False)


@functools.lru_cache(maxsize=2)
def _cached_testbed(world_config: WorldConfig, model_config: WorldModelConfig, cache_dir: str | None) -> Testbed:
    return load_testbed(world_config, model_config, cache_dir=Path(cache_dir) if cache_dir else None,
                        progress=_show_progress.get())


@functools.lru_cache(maxsize=2)
def _cached_real_testbed(model: str, settings_name: str, covariance: tuple[str, int], dataset: str,
                         cache_dir: str | None) -> Testbed:
    """Keyed by what the testbed depends on (not by lam or the target settings, which each editor
    applies on top: a sweep over them keeps one model in memory)."""
    settings = replace(EditingSettings.load(settings_name), covariance_text=covariance[0],
                       covariance_tokens=covariance[1])
    return load_real_testbed(model, settings=settings, dataset=dataset or None,
                             cache_dir=Path(cache_dir) if cache_dir else None, progress=_show_progress.get())


def testbed_for(scenario: Scenario, *, progress: bool = False) -> Testbed:
    """The scenario's model, facts and statistics, loaded once per process (``progress``: show
    progress bars if this call is the one that loads, fetches or builds it)."""
    token = _show_progress.set(progress)
    try:
        if scenario.is_world:
            return _cached_testbed(scenario.world_config(), scenario.model_config(), scenario.cache_dir or None)
        covariance = (scenario.settings.covariance_text, scenario.settings.covariance_tokens)
        return _cached_real_testbed(scenario.model_path or scenario.model, scenario.settings_name, covariance,
                                    scenario.dataset, scenario.cache_dir or None)
    finally:
        _show_progress.reset(token)


@functools.lru_cache(maxsize=8)
def dealt_cases_for(scenario: Scenario) -> dict[tuple[int, int], list[EditCase]]:
    """(client, round) -> edit cases, computed once per process and scenario."""
    return deal_cases(scenario, testbed_for(scenario).world)

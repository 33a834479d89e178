"""The embedded default in one call: world + world model + covariance statistics + MEMIT editor.

>>> bed = load_testbed()                      # trains the world model on first use, then cached
>>> cases = bed.world.edit_cases(50)
>>> payload = bed.editor().edit([c.request for c in cases])

Real models take the same path with :class:`fedke.editing.MemitEditor` directly: load the HF
model from a local path, compute :func:`fedke.stats.layer_covariances` over local text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedke.data.world import World, WorldConfig
from fedke.editing.memit import MemitConfig, MemitEditor, world_context_templates
from fedke.editing.presets import preset_for
from fedke.stats import knowledge_key_grams, layer_covariances, model_fingerprint
from fedke.worldmodel import WorldModel, WorldModelConfig, load_world_model


def world_layers(n_layer: int) -> tuple[int, ...]:
    """Edited layers of a world model: every block but the first (1..n-1), as in the prototypes."""
    return tuple(range(1, n_layer)) if n_layer > 1 else (0,)


# Stronger target optimisation for large batches on world models. With the reference's settings
# (clamp 0.75, 25 steps, stop at NLL 5e-2) the target vectors of 500 requests flip only 88.6% of
# them even when injected directly at the last edited layer, and MEMIT's solve then realises only
# part of each residual (the 128-wide model's last-token keys have an effective rank of about
# 110-270 for 500 requests), so 500-edit Global-Edit reaches ES 64 / Score 70. Optimising longer,
# less clamped, to a lower NLL makes every target flip its request when injected, and gives ES 79
# / Score 80 at lambda 300, at the cost of neighbourhood accuracy (NA 30 instead of 59) and 2.4x
# the target time. The default stays the reference's (it edits tens of requests per client well);
# pass ``**STRONG_TARGETS`` to ``Testbed.editor`` (``bench/edit.py`` reports both). With them, MEMIT
# passes (``passes=3`` or ``4`` at lambda 1000) reach ES 90-93 / Score 87 at 500 edits.
STRONG_TARGETS = {"clamp_norm_factor": 4.0, "v_num_grad_steps": 60, "loss_stop": 5e-4}


def default_memit_config(world: World, model_config: WorldModelConfig, **overrides) -> MemitConfig:
    """MEMIT settings for a world model: its layers, last-token facts, prefixes from filler text."""
    base = MemitConfig(layers=world_layers(model_config.n_layer), fact_token="last", lam=300.0,
                       context_templates=world_context_templates(world.filler, 5, seed=world.config.seed))
    return replace(base, **overrides)


@dataclass
class Testbed:
    """A world model with its covariance statistics and MEMIT settings."""

    world_model: WorldModel
    covariances: dict[str, np.ndarray]
    memit_config: MemitConfig
    cache_dir: Path | None = None
    _knowledge: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def world(self) -> World:
        return self.world_model.world

    @property
    def model(self):
        return self.world_model.model

    @property
    def tokenizer(self):
        return self.world_model.tokenizer

    def editor(self, *, progress: bool = False, **overrides) -> MemitEditor:
        """A MEMIT editor over this testbed's model (``overrides`` change MemitConfig fields).

        With ``knowledge_weight > 0`` the editor gets :meth:`knowledge_grams` (computed on first use,
        with a progress bar if ``progress``)."""
        config = replace(self.memit_config, **overrides) if overrides else self.memit_config
        grams = self.knowledge_grams(config, progress=progress) if config.knowledge_weight > 0 else None
        return MemitEditor(self.model, self.tokenizer, self.covariances, config, knowledge_grams=grams)

    def knowledge_grams(self, config: MemitConfig | None = None, *, progress: bool = False) -> dict[str, np.ndarray]:
        """``K0 K0^T`` over the keys of every fact the world model was trained on (each fact in each
        of its trained templates, :meth:`World.known_fact_requests`), per edited layer of ``config``
        (default: this testbed's): the preserved-knowledge term of ``MemitConfig.knowledge_weight``.
        Computed on the model's current weights (call it on the unedited model), cached on disk next
        to the covariances and kept in this testbed per weights, layers, fact token and prefixes."""
        config = replace(config or self.memit_config, knowledge_weight=0.0)
        key = (model_fingerprint(self.model), config.layers, config.fact_token, config.context_templates)
        if key not in self._knowledge:
            editor = MemitEditor(self.model, self.tokenizer, self.covariances, config)
            self._knowledge[key] = knowledge_key_grams(editor, self.world.known_fact_requests(),
                                                       cache_dir=self.cache_dir, progress=progress)
        return self._knowledge[key]


def load_testbed(world_config: WorldConfig | None = None, model_config: WorldModelConfig | None = None, *,
                 cache_dir: str | Path | None = None, progress: bool = True, device=None,
                 **memit_overrides) -> Testbed:
    """Load (or build and cache) the world model and its statistics over the world's filler text."""
    world_config = world_config or WorldConfig()
    model_config = model_config or WorldModelConfig()
    world_model = load_world_model(world_config, model_config, cache_dir=cache_dir, progress=progress, device=device)
    memit_config = default_memit_config(world_model.world, model_config, **memit_overrides)
    preset = preset_for(world_model.model, memit_config.layers)
    layer_names = [preset.mlp_out_name(layer) for layer in preset.layers]
    covariances = layer_covariances(world_model.model, world_model.tokenizer, layer_names,
                                    list(world_model.world.filler_text()), source=f"world-{world_config.fingerprint()}",
                                    cache_dir=cache_dir, progress=progress)
    return Testbed(world_model, covariances, memit_config, Path(cache_dir) if cache_dir is not None else None)

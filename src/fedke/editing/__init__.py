"""Knowledge editors producing Delta / K K^T payloads, and exact apply / revert of updates."""

from fedke.editing.base import Editor
from fedke.editing.memit import MemitConfig, MemitEditor, Targets, sample_context_templates, world_context_templates
from fedke.editing.presets import PRESETS, LayerError, LayerPreset, preset_for
from fedke.editing.weights import applied_update, apply_update, revert_update, weight_matrix

__all__ = [
    "Editor", "MemitConfig", "MemitEditor", "Targets", "sample_context_templates", "world_context_templates",
    "PRESETS", "LayerError", "LayerPreset", "preset_for",
    "applied_update", "apply_update", "revert_update", "weight_matrix",
]

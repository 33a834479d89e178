"""Layer presets: where an editor finds the parts of a Hugging Face causal LM.

MEMIT needs four names: the transformer block (its output is the residual stream the target
vectors live in), the MLP output projection it rewrites, the final norm and the LM head.
A preset is data, not code; :func:`preset_for` picks one from ``model.config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


class LayerError(KeyError):
    """A layer name that is not in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LayerPreset:
    """Module names of one model family. ``{}`` stands for the layer index.

    Parameters
    ----------
    block: the transformer block whose output holds the residual stream (MEMIT's ``layer_module_tmp``).
    mlp_out: the MLP output projection that is edited (MEMIT's ``rewrite_module_tmp``).
    final_norm: the final layer norm before the LM head.
    lm_head: the output embedding.
    layers: the layers edited by default.
    """

    family: str
    block: str
    mlp_out: str
    final_norm: str
    lm_head: str
    layers: tuple[int, ...]

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def block_name(self, layer: int) -> str:
        return self.block.format(layer)

    def with_layers(self, layers: Sequence[int]) -> "LayerPreset":
        return replace(self, layers=tuple(int(layer) for layer in layers))


GPT2 = LayerPreset("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", "lm_head",
                   layers=(13, 14, 15, 16, 17))
GPTJ = LayerPreset("gptj", "transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.ln_f", "lm_head",
                   layers=(3, 4, 5, 6, 7, 8))
LLAMA = LayerPreset("llama", "model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head",
                    layers=(4, 5, 6, 7, 8))

PRESETS: dict[str, LayerPreset] = {
    "gpt2": GPT2,
    "gptj": GPTJ,
    "llama": LLAMA,
    "mistral": replace(LLAMA, family="mistral"),
    "qwen2": replace(LLAMA, family="qwen2"),
    "qwen3": replace(LLAMA, family="qwen3"),
}


def preset_for(model: torch.nn.Module, layers: Sequence[int] | None = None) -> LayerPreset:
    """The preset of ``model``'s family, with ``layers`` (default: the family's MEMIT layers,
    clipped to the model's depth: the last ``min(5, n)`` but one layers of a small model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PRESETS:
        raise ValueError(f"no layer preset for model type {model_type!r}; known: {sorted(PRESETS)}. "
                         "Pass a LayerPreset of your own.")
    preset = PRESETS[model_type]
    n_layers = num_layers(model)
    if layers is None:
        layers = preset.layers if max(preset.layers) < n_layers else default_small_layers(n_layers)
    preset = preset.with_layers(layers)
    check_layers(model, preset)
    return preset


def default_small_layers(n_layers: int) -> tuple[int, ...]:
    """Layers to edit on a small model: all but the first and the last (at least one)."""
    if n_layers <= 2:
        return (0,)
    return tuple(range(1, n_layers - 1)) if n_layers > 3 else (1,)


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    for attr in ("n_layer", "num_hidden_layers", "num_layers"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ValueError("cannot tell the number of layers of this model")


def check_layers(model: torch.nn.Module, preset: LayerPreset) -> None:
    """Raise :class:`LayerError` naming the first module of ``preset`` missing from ``model``."""
    names = dict(model.named_modules())
    wanted = [preset.final_norm, preset.lm_head]
    for layer in preset.layers:
        wanted += [preset.block_name(layer), preset.mlp_out_name(layer)]
    for name in wanted:
        if name not in names:
            raise LayerError(f"layer {name!r} is not in the model ({type(model).__name__}, "
                             f"{num_layers(model)} layers); check the preset's names and layer indices")


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LayerError(f"layer {name!r} is not in the model ({type(model).__name__})") from None

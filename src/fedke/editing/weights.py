"""Reading and writing the edited weights as ``W`` of shape ``(d_out, d_in)``, exactly reversibly.

GPT-2's ``Conv1D`` stores ``W^T``; ``torch.nn.Linear`` stores ``W``. :func:`weight_matrix`
returns a ``(d_out, d_in)`` *view* either way, so an update written through it lands in place.
:func:`apply_update` keeps a copy of every weight it touches, and :func:`revert_update`
restores those copies bit for bit: apply-then-revert is exact whatever the dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch

from fedke.editing.presets import get_module


def is_transposed(module: torch.nn.Module) -> bool:
    """True for modules that store ``W^T`` (GPT-2's ``Conv1D``)."""
    return type(module).__name__ == "Conv1D"


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as a ``(d_out, d_in)`` view (no copy)."""
    weight = module.weight
    return weight.T if is_transposed(module) else weight


def layer_shape(model: torch.nn.Module, name: str) -> tuple[int, int]:
    d_out, d_in = weight_matrix(get_module(model, name)).shape
    return int(d_out), int(d_in)


@dataclass
class AppliedUpdate:
    """What :func:`apply_update` changed, to undo it exactly."""

    originals: dict[str, torch.Tensor]


def apply_update(model: torch.nn.Module, update: Mapping[str, np.ndarray | torch.Tensor]) -> AppliedUpdate:
    """``W_l <- W_l + Delta_l`` for each layer name in ``update``; returns the undo record."""
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, delta in update.items():
            weight = weight_matrix(get_module(model, name))
            if isinstance(delta, torch.Tensor):
                delta_t = delta
            else:
                array = np.asarray(delta)
                # arrays decoded from the wire are read-only views; torch would warn on sharing them
                delta_t = torch.as_tensor(array if array.flags.writeable else array.copy())
            if tuple(delta_t.shape) != tuple(weight.shape):
                raise ValueError(f"update for layer {name!r} has shape {tuple(delta_t.shape)}, "
                                 f"the weight is {tuple(weight.shape)} (d_out, d_in)")
            originals[name] = weight.detach().clone()
            weight.add_(delta_t.to(device=weight.device, dtype=weight.dtype))
    return AppliedUpdate(originals)


def revert_update(model: torch.nn.Module, applied: AppliedUpdate) -> None:
    """Restore the weights saved by :func:`apply_update`, bit for bit."""
    with torch.no_grad():
        for name, original in applied.originals.items():
            weight_matrix(get_module(model, name)).copy_(original)


@contextlib.contextmanager
def applied_update(model: torch.nn.Module, update: Mapping[str, np.ndarray | torch.Tensor] | None) -> Iterator[None]:
    """Apply ``update`` for the duration of the block, then restore the weights exactly."""
    if not update:
        yield
        return
    applied = apply_update(model, update)
    try:
        yield
    finally:
        revert_update(model, applied)

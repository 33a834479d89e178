"""What a client's editor produces and what crosses the wire: per-layer Delta, K K^T and R K^T.

Conventions (all NumPy, float64 in memory):

* A layer's weight ``W`` maps keys to values as ``v = W k``; ``W`` is ``(d_out, d_in)`` whatever
  the framework stores (GPT-2's ``Conv1D`` keeps the transpose; the layer preset hides that).
* ``delta``: the client's own update ``Delta_i = R_i K_i^T (lam C + K_i K_i^T)^-1``, ``(d_out, d_in)``.
* ``kkt``: ``K_i K_i^T``, ``(d_in, d_in)``, symmetric positive semi-definite.
* ``rkt``: ``R_i K_i^T``, ``(d_out, d_in)``. ``Delta_i (lam C + K_i K_i^T) = R_i K_i^T`` for the
  ``lam C`` the client used, so a server that knows ``lam C`` can derive one from the other.

Keys ``K_i`` and residuals ``R_i`` themselves never leave the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class LayerPayload:
    """One edited layer's contribution from one client."""

    delta: np.ndarray
    kkt: np.ndarray
    rkt: np.ndarray

    @property
    def d_out(self) -> int:
        return int(self.delta.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.delta.shape[1])


@dataclass(frozen=True)
class EditPayload:
    """Everything a client sends after editing: one :class:`LayerPayload` per edited layer.

    ``layers`` is keyed by the module name (``"transformer.h.3.mlp.c_proj"``) and ordered as the
    editor edited them. ``residual_norms`` holds ``||r_j||`` per request at the last edited layer
    against the model the client started from (the overlap detector of CollabEdit eq. 6).
    """

    layers: Mapping[str, LayerPayload]
    n_edits: int
    residual_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def deltas(self) -> dict[str, np.ndarray]:
        return {name: layer.delta for name, layer in self.layers.items()}

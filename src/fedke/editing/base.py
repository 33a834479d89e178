"""The one small protocol every fedke editor implements (MEMIT now; MALMEN and fine-tuning later)."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from fedke.data.records import EditRequest
from fedke.payload import EditPayload


@runtime_checkable
class Editor(Protocol):
    """Turns edit requests into a per-layer payload, leaving the model unchanged.

    ``regularisers()`` gives the ``A0_l`` of ``Delta_l = R_l K_l^T (A0_l + K_l K_l^T)^-1``
    (``lam C_l`` for MEMIT, ``kappa I`` for MALMEN) that a CollabEdit server merges with.
    """

    layer_names: list[str]

    def edit(self, requests: Sequence[EditRequest], *,
             regularisers: Mapping[str, np.ndarray] | None = None) -> EditPayload: ...

    def regularisers(self) -> dict[str, np.ndarray]: ...

    def layer_shapes(self) -> dict[str, tuple[int, int]]: ...

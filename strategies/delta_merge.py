"""Destructive baselines: FedAvg, Task Arithmetic and TIES over the clients' ``Delta_i``.

One strategy class, :class:`DeltaMergeStrategy`, over :func:`fedke.merge.merge_deltas` (the
generalised task arithmetic of mergekit); the three named strategies only fix its options. These
merges use the deltas alone (``K K^T`` and ``R K^T`` are validated, then dropped), so they are not
equivalent to Global-Edit: they are the baselines CollabEdit is compared with.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedke.merge import MergeMethod, get_merge_method, merge_deltas
from fedke.payload import EditPayload

from .base import EditMergeStrategy, RoundMerger

__all__ = ["DeltaMergeStrategy", "FedAvg", "TaskArithmetic", "TIES"]


class DeltaMergeStrategy(EditMergeStrategy):
    """Merge the clients' deltas with one named method of :func:`fedke.merge.merge_deltas`.

    Per layer: ``Delta = merge_deltas([Delta_i], method, weights, scale, density)``. Every payload
    must carry ``delta``. The round keeps only the accepted deltas (TIES reads them twice), never
    the ``K K^T``.

    Parameters
    ----------
    method : str
        A name of :data:`fedke.merge.MERGE_METHODS` (``"fedavg"``, ``"simple_average"``,
        ``"task_arithmetic"``, ``"ties"``). Required.
    scale : float (default: 1.0)
        lambda applied to the merged delta.
    density : float (default: 1.0)
        Fraction of each client's entries kept by magnitude before merging (1.0: no trimming).
    weighted : bool (default: False)
        Weight each client by its ``n_edits`` (if they are all 0, plain weights are used).
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required).
    """

    required_arrays = ("delta",)

    def __init__(
        self, *, method: str, scale: float = 1.0, density: float = 1.0, weighted: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.method: MergeMethod = get_merge_method(method)
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
        if not (0.0 < float(density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        self.scale = float(scale)
        self.density = float(density)
        self.weighted = bool(weighted)

    def hyperparameters(self) -> dict[str, Any]:
        settings = super().hyperparameters()
        settings.update(method=self.method.name, scale=self.scale, density=self.density, weighted=self.weighted)
        return settings

    def new_merger(self) -> RoundMerger:
        return _DeltaMerger(self)


class _DeltaMerger(RoundMerger):
    """Collects the round's deltas per layer, merges them at the end."""

    def __init__(self, strategy: DeltaMergeStrategy) -> None:
        self.strategy = strategy
        self.deltas: dict[str, list[np.ndarray]] = {spec.name: [] for spec in strategy.layer_specs}
        self.weights: list[float] = []

    def add(self, payload: EditPayload, weight: float) -> None:
        for name, layer in payload.layers.items():
            self.deltas[name].append(layer.delta)
        self.weights.append(float(weight))

    def result(self) -> dict[str, np.ndarray]:
        strategy = self.strategy
        weights = None
        if strategy.weighted and sum(self.weights) > 0:
            weights = self.weights
        return {
            name: merge_deltas(
                deltas, method=strategy.method, weights=weights, scale=strategy.scale, density=strategy.density
            )
            for name, deltas in self.deltas.items()
        }


class FedAvg(DeltaMergeStrategy):
    """Federated Averaging of the clients' deltas.

    Implementation based on arXiv 1602.05629 (McMahan et al.): ``Delta = sum_i w_i Delta_i / sum_i w_i``
    with ``w_i = n_edits_i`` (or 1 each), divided by the actual number of clients, whatever it is.

    Parameters
    ----------
    weighted : bool (default: True)
        Weight each client by its ``n_edits``; False is the plain mean ("simple average").
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required).
    """

    def __init__(self, *, weighted: bool = True, **kwargs: Any) -> None:
        super().__init__(method="fedavg", weighted=weighted, **kwargs)


class TaskArithmetic(DeltaMergeStrategy):
    """Task Arithmetic: ``Delta = scale * sum_i Delta_i``.

    Implementation based on arXiv 2212.04089 (Ilharco et al., "Editing models with task arithmetic").

    Parameters
    ----------
    scale : float (default: 1.0)
        lambda_TA (the CollabEdit authors' code uses 1.0; it over-edits, see NOTES.md section 8).
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required).
    """

    def __init__(self, *, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(method="task_arithmetic", scale=scale, **kwargs)


class TIES(DeltaMergeStrategy):
    """TIES-merging: trim each delta to its top entries, elect signs, disjoint mean, scale.

    Implementation based on arXiv 2306.01708 (Yadav et al.); the exact rule is
    :func:`fedke.merge.merge_deltas` with ``method="ties"``.

    Parameters
    ----------
    density : float (default: 0.2)
        Fraction of each client's entries kept by magnitude (k = 20%).
    scale : float (default: 1.0)
        lambda applied to the merged delta (TIES paper grid 0.8-2.5; authors' code 0.4).
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required).
    """

    def __init__(self, *, density: float = 0.2, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(method="ties", density=density, scale=scale, **kwargs)

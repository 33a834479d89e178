"""Flower strategies of fedke (legacy ``flwr.server.strategy.Strategy`` API, for ``NumPyClient``).

* :class:`CollabEdit`: the exact, non-destructive merge (arXiv 2410.09508), optional dynamic
  covariance;
* :class:`LayerwiseCollabEdit`: CollabEdit one edited layer per server round, the exact merge of
  *sequential* (stock) MEMIT;
* :class:`FedAvg`, :class:`TaskArithmetic`, :class:`TIES`: the destructive delta-merge baselines;
* :class:`EditMergeStrategy`: their shared base (validation, cumulative update, metrics, state).

Build one by name with :func:`make_strategy`, e.g. ``make_strategy("collabedit",
layer_specs=specs, regularisers=regs)``.
"""

from __future__ import annotations

from typing import Any

from .base import EditMergeStrategy, RoundMerger
from .collabedit import CollabEdit
from .delta_merge import TIES, DeltaMergeStrategy, FedAvg, TaskArithmetic
from .layerwise import LayerwiseCollabEdit
from .secagg import CollabEditSecAgg, SecAggBounds

__all__ = [
    "STRATEGIES",
    "TIES",
    "CollabEdit",
    "CollabEditSecAgg",
    "DeltaMergeStrategy",
    "EditMergeStrategy",
    "FedAvg",
    "LayerwiseCollabEdit",
    "RoundMerger",
    "SecAggBounds",
    "TaskArithmetic",
    "make_strategy",
]

#: Strategy name -> class (names as in the run config's ``strategy`` key; a scenario picks
#: ``layerwise_collabedit`` through its ``layerwise`` key).
STRATEGIES: dict[str, type[EditMergeStrategy]] = {
    "collabedit": CollabEdit,
    "fedavg": FedAvg,
    "task_arithmetic": TaskArithmetic,
    "ties": TIES,
    "layerwise_collabedit": LayerwiseCollabEdit,
}


def _normalise(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def make_strategy(name: str, **kwargs: Any) -> EditMergeStrategy:
    """An instance of the strategy registered as ``name`` (case, ``-``, ``_`` and spaces ignored).

    ``kwargs`` go to its constructor (``layer_specs`` always; ``regularisers`` for CollabEdit).
    Raises ValueError listing the valid names for an unknown one.
    """
    wanted = _normalise(name)
    for key, cls in STRATEGIES.items():
        if _normalise(key) == wanted or _normalise(cls.__name__) == wanted:
            return cls(**kwargs)
    raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGIES)}")

"""Layer-wise CollabEdit as a Flower strategy: the exact federated merge of *sequential* (stock) MEMIT.

Why (:mod:`fedke.layerwise`): stock MEMIT writes layer ``l_j``'s update before it computes the keys
and residual of ``l_{j+1}``. Client ``c``'s keys ``K_c`` and residuals ``R_c`` at a later layer
therefore see only its *own* earlier updates, while Global-Edit's see the update of every
request, and one-shot CollabEdit of the clients' sequential payloads is only approximate (12
Score points below Global-Edit at 10 x 50 on the world).

The protocol. An edit round walks the edited layers ``l_1 < ... < l_L`` in ``L`` Flower server
rounds (sub-rounds)::

    server round s  <->  edit round r = (s - 1) // L + 1,  layer step i = (s - 1) % L  (0-based)

Every client optimises its target vectors ``z`` once per edit round, on the round-start model
``W0 + U_r`` (``U_r``: the cumulative update when the edit round begins). In step ``i`` it sets its
model to ``W0 + U_r + sum_{j<i} Delta_{l_j}`` (this round's already merged layers), reads its keys
``K_c`` at layer ``l_i`` and its residuals ``R_c = (z - h_L) / (L - i)`` (``/ L`` with the even
split) and sends ``K_c K_c^T`` and ``R_c K_c^T`` for ``l_i`` only. The server solves

    Delta_{l_i} = (sum_c R_c K_c^T) (A_t + sum_c K_c K_c^T)^-1,

``A_t = A0 = lam C`` or, with dynamic covariance (eq. 7), ``beta0 A0 + beta1 kkt_total[l_i]``
(``kkt_total`` summing the ``K K^T`` merged into ``l_i`` in EARLIER edit rounds: committing step
``i``'s sum never reaches this round's solves). Keys and residuals are per request, so the sums are those of one sequential MEMIT edit
of every client's requests: the result equals sequential Global-Edit (float rounding aside;
tests/test_layerwise_strategy.py).

What crosses the wire in step ``i`` (the price is ``L`` exchanges per edit round, no new kind of data):

* server -> client: ``FitIns.parameters`` = :func:`fedke.codec.encode_layer_step` ``(U_r,
  {l_j: Delta_{l_j}, j < i})``, two update blocks (the client needs ``U_r`` on its own to
  recompute its targets when it lost them, e.g. a fresh ClientApp process); ``FitIns.config`` =
  ``{"server_round": r, "layer_step": i, "layer_steps": L}`` (``server_round`` is the EDIT round:
  clients pick their requests by it);
* client -> server: a one-layer :class:`fedke.payload.EditPayload` of ``l_i`` (``K K^T`` packed and
  ``R K^T``; no ``Delta``), ``n_edits``, and the per-request residual norms ``||z - h||`` in step 0
  only.

MEMIT passes (``passes = P``, :attr:`fedke.editing.MemitConfig.passes`): an edit round walks the
layers ``P`` times, ``P x L`` steps, step ``i`` editing layer ``l_{i mod L}`` in pass ``i // L``
with the same targets; the model of step ``i`` holds every merge of the earlier steps (all layers
once ``i >= L``), and ``round_update`` sums each layer's passes. This equals sequential Global-Edit
with ``passes = P``. ``kkt_total`` takes each layer's ``K K^T`` of the first pass only (the keys
Global-Edit's payload carries), and the solves of the later passes use ``A_t`` as it stood when the
edit round began (``round_kkt`` holds what the first pass committed, to leave it out).

Server state: the cumulative update (``global_update``, ``U_r + sum_{j<=i} Delta_{l_j}`` after
step ``i``), ``kkt_total``, the round-start update ``round_start`` (``U_r``), this round's merged
updates ``round_update`` (zeros for layers not merged yet) and the position (edit round, steps
aggregated). :meth:`LayerwiseCollabEdit.state_dict` holds all of it, so a strategy restored after
any step continues that edit round; the run checkpoints of :mod:`fedke.simulations.checkpoint`
are written at edit-round boundaries only (a crash mid-round redoes that round's steps).

A step without accepted replies, or whose merge fails, leaves its layer without an update this
edit round (logged; the later steps go on from the model as it is) and never touches the other
layers. Evaluation (the oracle ``evaluate`` and federated ``configure_evaluate``) runs only after
the last step of an edit round, numbered by the edit round; ``on_round_end`` is called once per
edit round with :func:`edit_round_summary`. Not combinable (refused): conflict detection, the
delta form of the merge (``use_sums=False``: clients send no ``Delta``), secure aggregation
(:class:`fedke.strategies.CollabEditSecAgg` is one-shot) and the clients' residual guard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from flwr.common import Parameters, Scalar, ndarrays_to_parameters

from fedke.codec import LayerSpec, encode_layer_step
from fedke.payload import EditPayload

from .base import RoundAggregation, RoundMerger
from .collabedit import CollabEdit, _CollabMerger

__all__ = ["LayerwiseCollabEdit", "edit_round_summary", "layer_step_of"]

_SUMMED = ("n_results", "n_accepted", "n_rejected", "n_failures", "decode_seconds", "merge_seconds", "aggregate_seconds")


def layer_step_of(server_round: int, n_layers: int) -> tuple[int, int]:
    """``(edit round, layer step)`` of Flower's ``server_round >= 1`` with ``n_layers`` steps per edit round."""
    if isinstance(server_round, bool) or int(server_round) < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round!r}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return (int(server_round) - 1) // n_layers + 1, (int(server_round) - 1) % n_layers


def edit_round_summary(steps: Sequence[Mapping[str, Any]], n_layers: int) -> dict[str, Scalar]:
    """One edit round's merge metrics from its steps' metrics (each with ``layer_step``).

    ``n_results``, ``n_accepted``, ``n_rejected``, ``n_failures`` and the timings are summed over the
    steps (replies handled in the edit round); ``n_edits`` is the smallest count of accepted edits
    of any step (the edits merged into every layer; 0 when a step is missing); ``layers_applied``
    counts the steps whose merge was applied and ``applied`` says whether all ``n_layers`` were;
    ``n_targets_reused`` (when reported) sums the clients that reused their targets (a client keeping
    them in its ``Context.state`` reuses them in every step but the first);
    ``update_norm`` is the Frobenius norm of the edit round's whole update
    (``sqrt(sum_i ||Delta_{l_i}||^2)``, the layers being disjoint; with several passes the strategy
    replaces it by the norm of ``round_update``); ``global_update_norm`` is the
    last step's; the residual-norm statistics are step 0's (only step 0 reports them); ``error``
    joins the steps' errors.
    """
    by_step = {int(m["layer_step"]): m for m in steps}
    out: dict[str, Scalar] = {key: sum(float(m.get(key, 0)) for m in by_step.values()) for key in _SUMMED}
    for key in ("n_results", "n_accepted", "n_rejected", "n_failures"):
        out[key] = int(out[key])
    complete = len(by_step) == n_layers
    out["n_edits"] = min(int(m.get("n_edits", 0)) for m in by_step.values()) if complete and by_step else 0
    out["layer_steps"] = int(n_layers)
    out["layers_applied"] = sum(bool(m.get("applied")) for m in by_step.values())
    out["applied"] = out["layers_applied"] == n_layers
    if any("n_targets_reused" in m for m in by_step.values()):
        out["n_targets_reused"] = sum(int(m.get("n_targets_reused", 0)) for m in by_step.values())
    out["update_norm"] = math.sqrt(sum(float(m.get("update_norm", 0.0)) ** 2 for m in by_step.values()))
    if by_step:
        out["global_update_norm"] = float(by_step[max(by_step)].get("global_update_norm", 0.0))
    out.update({key: value for key, value in by_step.get(0, {}).items() if key.startswith("residual_norm_")})
    errors = [f"layer step {i}: {m['error']}" for i, m in sorted(by_step.items()) if m.get("error")]
    if errors:
        out["error"] = "; ".join(errors)
    return out


class _LayerStepMerger(RoundMerger):
    """One step's merge: CollabEdit's running sums of layer ``l_i`` alone.

    :meth:`result` returns ``Delta_{l_i}`` and zeros for the other layers (the base strategy adds a
    full update to the cumulative one: the others stay bit for bit); :meth:`commit` adds
    ``Delta_{l_i}`` to ``round_update`` and, in the first pass, the step's ``sum K K^T`` to
    ``kkt_total[l_i]`` (and to ``round_kkt[l_i]``).
    """

    def __init__(self, strategy: "LayerwiseCollabEdit", step: int) -> None:
        self.strategy = strategy
        self.first_pass = step < len(strategy.layer_specs)
        self.name = strategy.layer_specs[step % len(strategy.layer_specs)].name
        self.sums = _CollabMerger(strategy, layers=[self.name])
        self.delta: np.ndarray | None = None

    def add(self, payload: EditPayload, weight: float) -> None:
        self.sums.add(payload, weight)

    def result(self) -> dict[str, np.ndarray]:
        self.delta = self.sums.result()[self.name]
        return {spec.name: self.delta if spec.name == self.name else np.zeros((spec.d_out, spec.d_in))
                for spec in self.strategy.layer_specs}

    def commit(self) -> None:
        if self.first_pass:
            self.sums.commit()
            self.strategy.round_kkt[self.name] = self.strategy.round_kkt[self.name] + self.sums.kkt_sum[self.name]
        self.strategy.round_update[self.name] = self.strategy.round_update[self.name] + self.delta


class LayerwiseCollabEdit(CollabEdit):
    """Layer-wise CollabEdit: sequential MEMIT merged exactly, one edited layer per Flower server round.

    Implementation based on arXiv 2410.09508 (Lemma 1, eq. 4 and eq. 7) applied one layer at a
    time (:mod:`fedke.layerwise`; the protocol, the wire and the state are in this module's
    docstring). One edit round is ``passes x L`` Flower server rounds (``L = len(layer_specs)``):
    run the server for ``num_edit_rounds * steps_per_round`` rounds. The clients are :class:`fedke.simulations.client.EditClient`
    (they answer a fit config holding ``layer_step``).

    Parameters
    ----------
    regularisers : Mapping[str, np.ndarray]
        ``A0_l = lam * C_l`` per edited layer, as for :class:`CollabEdit`. Required.
    dynamic_covariance : tuple[float, float] | None (default: None)
        ``(beta0, beta1)`` of eq. 7; ``A_t`` of layer ``l_i`` uses the ``K K^T`` merged into ``l_i``
        in earlier edit rounds.
    passes : int (default: 1)
        MEMIT passes per edit round (the clients' editors must use the same ``passes``): the
        layers are walked ``passes`` times with the targets fixed.
    **kwargs
        The :class:`EditMergeStrategy` parameters (``layer_specs`` is required, in the order the
        editor edits them, which is the step order). ``conflict_coordinator`` and ``use_sums=False``
        are refused.
    """

    _STATE_GROUPS: ClassVar[dict[str, str]] = {**CollabEdit._STATE_GROUPS, "round_start": "update",
                                               "round_update": "update", "round_kkt": "gram"}

    def __init__(self, *, passes: int = 1, **kwargs: Any) -> None:
        if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
            raise ValueError(f"passes must be a positive integer, got {passes!r}")
        if kwargs.get("conflict_coordinator") is not None:
            raise ValueError("layer-wise CollabEdit cannot run conflict detection: its claims and decisions follow "
                             "one-shot edit rounds (use layerwise = false, or turn conflict detection off)")
        if not kwargs.get("use_sums", True):
            raise ValueError("layer-wise CollabEdit merges from the sums S and G only (use_sums=True): its clients "
                             "send K K^T and R K^T, no Delta")
        super().__init__(**kwargs)
        self.passes = int(passes)
        #: The cumulative update at the start of the current edit round (``U_r``).
        self.round_start: dict[str, np.ndarray] = {name: a.copy() for name, a in self.global_update.items()}
        #: This edit round's merged update per layer (zeros for the layers not merged yet).
        self.round_update: dict[str, np.ndarray] = {name: np.zeros_like(a) for name, a in self.global_update.items()}
        #: The ``K K^T`` this edit round committed to ``kkt_total`` (first pass), per layer.
        self.round_kkt: dict[str, np.ndarray] = {name: np.zeros_like(a) for name, a in self.kkt_total.items()}
        #: The edit round ``round_start`` belongs to (0 before the first).
        self.current_edit_round = 0
        #: Steps of the current edit round aggregated so far (the next step must not be below it).
        self.steps_done = 0

    # ------------------------------------------------------------------------- positions

    @property
    def steps_per_round(self) -> int:
        return self.passes * len(self.layer_specs)

    def layer_index(self, step: int) -> int:
        """The edited layer (index into ``layer_specs``) of ``step``: ``step mod L``."""
        return int(step) % len(self.layer_specs)

    def hyperparameters(self) -> dict[str, Any]:
        settings = super().hyperparameters()
        settings["passes"] = self.passes
        return settings

    def regulariser_for_round(self) -> dict[str, np.ndarray]:
        """``A_t`` as it stood when the edit round began (eq. 7 without this round's first-pass ``K K^T``)."""
        if self.dynamic_covariance is None:
            return dict(self.regularisers)
        beta0, beta1 = self.dynamic_covariance
        return {name: beta0 * a0 + beta1 * (self.kkt_total[name] - self.round_kkt[name])
                for name, a0 in self.regularisers.items()}

    def position(self, server_round: int) -> tuple[int, int]:
        """``(edit round, layer step)`` of Flower's ``server_round``."""
        return layer_step_of(server_round, self.steps_per_round)

    def _enter(self, server_round: int) -> tuple[int, int]:
        """The position of ``server_round``; on the first server round of a new edit round, start it
        (``round_start`` := the cumulative update, ``round_update`` := 0). Idempotent."""
        edit_round, step = self.position(server_round)
        if edit_round < self.current_edit_round:
            raise RuntimeError(f"server round {server_round} belongs to edit round {edit_round}, but the strategy is "
                               f"already in edit round {self.current_edit_round} (server rounds out of order?)")
        if edit_round > self.current_edit_round:
            self.round_start = {name: a.copy() for name, a in self.global_update.items()}
            self.round_update = {name: np.zeros_like(a) for name, a in self.global_update.items()}
            self.round_kkt = {name: np.zeros_like(a) for name, a in self.kkt_total.items()}
            self.current_edit_round = edit_round
            self.steps_done = 0
        return edit_round, step

    def round_labels(self, server_round: int) -> dict[str, Scalar]:
        edit_round, step = self.position(server_round)
        return {"edit_round": edit_round, "layer_step": step, "layer": self.layer_specs[self.layer_index(step)].name,
                "pass": step // len(self.layer_specs)}

    # ------------------------------------------------------------------------- fit

    def fit_updates(self, server_round: int) -> dict[str, Mapping[str, np.ndarray]]:
        """``{"round_start": the edit round's start, "merged": {l_j: round_update[l_j]}}`` over the layers
        merged in the earlier steps of this edit round (``l_1..l_{i-1}``; every layer from the second pass on)."""
        _, step = self._enter(server_round)
        merged = {spec.name: self.round_update[spec.name] for spec in self.layer_specs[:step]}
        return {"round_start": self.round_start, "merged": merged}

    def fit_parameters(self, server_round: int) -> Parameters:
        """:meth:`fit_updates` as ``encode_layer_step(round_start, merged)``."""
        updates = self.fit_updates(server_round)
        return ndarrays_to_parameters(encode_layer_step(updates["round_start"], updates["merged"], dtype=self.wire_dtype))

    def fit_config(self, server_round: int, cid: str | None = None) -> dict[str, Scalar]:
        """``{"server_round": edit round, "layer_step": i, "layer_steps": passes x L, **on_fit_config_fn(edit round)}``."""
        edit_round, step = self._enter(server_round)
        config = super().fit_config(edit_round, cid)
        config.update({"layer_step": step, "layer_steps": self.steps_per_round})
        return config

    def reply_specs(self, server_round: int) -> Sequence[LayerSpec]:
        """Step ``i``'s replies carry layer ``l_i`` only."""
        return (self.layer_specs[self.layer_index(self.position(server_round)[1])],)

    def new_merger(self) -> RoundMerger:
        raise TypeError("layer-wise CollabEdit merges one layer per server round: use begin_round(server_round) "
                        "or aggregate_fit, not merge() of whole payloads")

    def merger_for(self, server_round: int) -> RoundMerger:
        return _LayerStepMerger(self, self.position(server_round)[1])

    def begin_round(self, server_round: int, **options: Any) -> RoundAggregation:
        """Step ``i``'s aggregation (validation against layer ``l_i`` only; ``options`` as
        :meth:`EditMergeStrategy.begin_round`). RuntimeError if step ``i`` of this edit round was
        already aggregated (a step merged twice would add its layer twice)."""
        edit_round, step = self._enter(server_round)
        if step < self.steps_done:
            raise RuntimeError(f"server round {server_round}: layer step {step} of edit round {edit_round} "
                               f"was already aggregated ({self.steps_done} steps done)")
        return super().begin_round(server_round, **options)

    def _finish_round(self, aggregation: RoundAggregation) -> tuple[Parameters | None, dict[str, Scalar]]:
        outcome = super()._finish_round(aggregation)
        self.steps_done = max(self.steps_done, self.position(aggregation.server_round)[1] + 1)
        return outcome

    def notify_round_end(self, server_round: int, metrics: Mapping[str, Scalar]) -> None:
        """``on_round_end(edit round, edit_round_summary(...))`` after the edit round's last step only."""
        if self.on_round_end is None or not self.ends_edit_round(server_round):
            return
        edit_round = self.edit_round(server_round)
        steps = [m for m in self.round_metrics if m.get("edit_round") == edit_round]
        summary = edit_round_summary(steps, self.steps_per_round)
        if self.passes > 1:  # a layer's passes add up: the round's update is round_update, not a sum of squares
            summary["update_norm"] = math.sqrt(sum(float(np.vdot(a, a)) for a in self.round_update.values()))
        self.on_round_end(edit_round, summary)

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """The oracle, after an edit round's last step only, called with the EDIT round."""
        if server_round > 0 and not self.ends_edit_round(server_round):
            return None
        return super().evaluate(self.edit_round(server_round), parameters)

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Federated evaluation after an edit round's last step only; config ``server_round`` = the edit round."""
        if server_round > 0 and not self.ends_edit_round(server_round):
            return []
        return super().configure_evaluate(self.edit_round(server_round), parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return super().aggregate_evaluate(self.edit_round(server_round), results, failures)

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """:meth:`CollabEdit.state_dict` plus ``round_start`` and ``round_update`` arrays and
        ``meta["layerwise"] = {"edit_round", "steps_done"}``: enough to continue mid edit round."""
        state = super().state_dict()
        state["meta"]["layerwise"] = {"edit_round": int(self.current_edit_round), "steps_done": int(self.steps_done)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError (nothing changed) if the position is missing or
        the arrays break ``global_update = round_start + round_update``."""
        try:
            position = dict(state["meta"]["layerwise"])
            edit_round, steps_done = position["edit_round"], position["steps_done"]
        except (KeyError, TypeError, ValueError):
            raise ValueError("state lacks meta['layerwise'] = {'edit_round', 'steps_done'}") from None
        for name, value in (("edit_round", edit_round), ("steps_done", steps_done)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state meta['layerwise'][{name!r}] must be a non-negative integer, got {value!r}")
        if steps_done > self.steps_per_round:
            raise ValueError(f"state steps_done {steps_done} exceeds the {self.steps_per_round} layer steps")
        arrays = state["arrays"]
        for spec in self.layer_specs:
            keys = [f"{group}/{spec.name}" for group in ("global_update", "round_start", "round_update")]
            if all(key in arrays for key in keys):
                total, start, update = (np.asarray(arrays[key], dtype=np.float64) for key in keys)
                if total.shape == start.shape == update.shape and not np.array_equal(total, start + update):
                    raise ValueError(f"state layer {spec.name!r}: global_update differs from round_start + round_update")
        super().load_state_dict(state)
        self.current_edit_round = edit_round
        self.steps_done = steps_done

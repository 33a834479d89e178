"""The fedke Flower client: a ``NumPyClient`` that wraps a knowledge editor and a model.

Each round it receives the cumulative update of the edited layers (never the full model),
applies it to its copy of the base model, edits its own requests for the round and replies
with the encoded payload (Delta, K K^T, R K^T per layer). Its requests and keys never leave it.
It evaluates its own requests on the global model when asked. The base model is restored bit
for bit after every call, so one loaded model can serve every client of a worker process.

Layer-wise CollabEdit (:mod:`fedke.strategies.layerwise`): a fit config holding ``layer_step``
``i`` asks for step ``i`` of edit round ``server_round``. The parameters are two update blocks
(:func:`fedke.codec.decode_layer_step`): the round-start update ``U_r`` and this round's merged
layers ``l_1..l_{i-1}``. The client's target vectors ``z`` are optimised once per edit round, on
``W0 + U_r``, and kept between steps in ``state`` (the ClientApp's ``Context.state`` under Flower,
which the SuperNode or the simulation engine carries from one message to the next; no module
globals): an ``ArrayRecord`` ``"fedke.layerwise.targets"`` (``z`` and ``h_init``, float64) and a
``ConfigRecord`` ``"fedke.layerwise.targets.meta"`` keyed by a SHA-256 over the requests and the
round-start update's float64 values. When they are missing or the key differs (a fresh process,
another round) the client recomputes them on ``W0 + U_r``: the same computation, so bit for bit
the same targets. It replies with layer ``l_i`` only: ``K K^T`` and ``R K^T`` computed on
``W0 + U_r + sum_{j<i} Delta_{l_j}`` (:meth:`fedke.editing.MemitEditor.layer_payload`), no
``Delta``; residual norms ``||z - h||`` in step 0 only. With MEMIT passes (``passes = P`` on the
editor and the strategy) an edit round has ``P x L`` steps: step ``i`` edits layer ``l_{i mod L}``
on the model holding every earlier step's merge, with the same targets.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import Array, ArrayRecord, ConfigRecord, RecordDict

from fedke.codec import LayerSpec, decode_layer_step, decode_update, encode_payload, encode_update, payload_nbytes
from fedke.conflict import CLAIMS_KEY, failing_cases
from fedke.data.records import EditCase
from fedke.editing.base import Editor
from fedke.editing.weights import applied_update
from fedke.eval import evaluate_cases
from fedke.overlap import guard_mask, guarded_edit
from fedke.payload import EditPayload, LayerPayload

#: ``Context.state`` records of the layer-wise targets (see the module docstring).
TARGETS_RECORD = "fedke.layerwise.targets"
TARGETS_META = "fedke.layerwise.targets.meta"


def targets_key(requests: Sequence[Any], round_start: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over what a request batch's targets depend on in a run: the requests (prompt, subject,
    new object, in order) and the round-start update's float64 values, layer by layer."""
    digest = hashlib.sha256(json.dumps([[r.prompt, r.subject, r.target_new] for r in requests]).encode())
    for name in sorted(round_start):
        array = np.ascontiguousarray(round_start[name], dtype=np.float64)
        digest.update(json.dumps([name, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples they were (a target signature, request keys)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class EditClient(NumPyClient):
    """A federated knowledge-editing client.

    Parameters
    ----------
    editor : fedke.editing.Editor
        The knowledge editor (e.g. :class:`fedke.editing.MemitEditor`) over ``model``.
    model, tokenizer :
        The client's copy of the base model (the editor's) and its tokenizer.
    cases_by_round : Mapping[int, Sequence[EditCase]]
        The client's private edit cases per server round (rounds without any send an empty payload).
    wire_dtype : numpy dtype (default: float32)
        dtype of the payload on the wire.
    residual_guard : float (default: 0.0)
        Overlap guard (:func:`fedke.overlap.guarded_edit`): skip requests whose residual norm
        against the global model is strictly below this (already in the model); 0 disables it.
        The fit metrics report ``n_skipped``.
    conflict_agent : fedke.conflict.ConflictAgent | None (default: None)
        Conflict handling (:mod:`fedke.conflict`): resolves conflicts among the client's own
        requests, sends HMAC claims (or after-the-fact failure reports) in the fit metrics, and
        acts on the server's decisions (losers withdraw, winners re-edit with augmentation).
    secure_aggregation : bool (default: False)
        Reply with :func:`fedke.secagg.encode_secagg` (the sums layout scaled by the
        bounds in the fit config, ``num_examples = 1``, no metrics) for ``secaggplus_mod`` to mask;
        see :mod:`fedke.strategies.secagg`.
    state : flwr.common.RecordDict | None (default: None)
        Where layer-wise CollabEdit keeps the round's targets between steps: the ClientApp's
        ``context.state``. None: a fresh ``RecordDict`` owned by this client (in-process loops,
        which keep the client between steps).
    """

    def __init__(self, editor: Editor, model, tokenizer, cases_by_round: Mapping[int, Sequence[EditCase]], *,
                 wire_dtype: Any = np.float32, residual_guard: float = 0.0, conflict_agent=None,
                 secure_aggregation: bool = False, state: RecordDict | None = None) -> None:
        self.editor = editor
        self.model = model
        self.tokenizer = tokenizer
        self.cases_by_round = {int(k): list(v) for k, v in cases_by_round.items()}
        self.wire_dtype = np.dtype(wire_dtype)
        self.secure_aggregation = bool(secure_aggregation)
        self.layer_specs = [LayerSpec(name, *shape) for name, shape in editor.layer_shapes().items()]
        guard_mask([], residual_guard)  # validates the threshold
        self.residual_guard = float(residual_guard)
        self.conflict_agent = conflict_agent
        self.state = RecordDict() if state is None else state

    # ------------------------------------------------------------------ helpers
    def _update(self, parameters: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if not parameters:
            return {}
        return decode_update(list(parameters), expected=self.layer_specs)

    def _empty_payload(self) -> EditPayload:
        layers = {spec.name: LayerPayload(np.zeros((spec.d_out, spec.d_in)), np.zeros((spec.d_in, spec.d_in)),
                                          np.zeros((spec.d_out, spec.d_in))) for spec in self.layer_specs}
        return EditPayload(layers=layers, n_edits=0)

    def cases_until(self, server_round: int) -> list[EditCase]:
        """Every case this client has edited up to and including ``server_round``."""
        return [case for r, cases in sorted(self.cases_by_round.items()) if r <= server_round for case in cases]

    # ------------------------------------------------------------------ NumPyClient
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return encode_update({s.name: np.zeros((s.d_out, s.d_in)) for s in self.layer_specs}, dtype=self.wire_dtype)

    def fit(self, parameters, config):
        """The legacy wire form: the listed update in, the listed payload out (:mod:`fedke.codec`)."""
        if "layer_step" in config:
            step = self.check_layer_step(config)
            round_start, merged = decode_layer_step(list(parameters), expected=self.layer_specs,
                                                    merged_expected=self.layer_specs[:step])
            payload, metrics = self.edit_layer_step(round_start, merged, config)
            arrays = encode_payload(payload, dtype=self.wire_dtype, send_delta=False)
        else:
            payload, metrics = self.edit(self._update(parameters), config)
            if self.secure_aggregation:  # only the SecAgg+ layout, scaled by the server's public bounds
                from fedke.secagg import SecAggBounds, encode_secagg

                return encode_secagg(payload, self.layer_specs, SecAggBounds.from_config(config)), 1, {}
            arrays = encode_payload(payload, dtype=self.wire_dtype)
        metrics["payload_bytes"] = payload_nbytes(arrays)
        return arrays, payload.n_edits, metrics

    # ------------------------------------------------------------------ the edits, whatever the wire
    def edit(self, update: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[EditPayload, dict[str, Any]]:
        """This client's requests of ``config["server_round"]`` edited on ``W0 + update``: ``(payload, metrics)``."""
        server_round = int(config.get("server_round", 1))
        cases = self.cases_by_round.get(server_round, [])
        started = time.perf_counter()
        metrics: dict[str, Any] = {}
        with applied_update(self.model, update):
            if self.conflict_agent is not None:
                requests = self._conflict_requests(server_round, cases, config, metrics)
            else:
                requests = [case.request for case in cases]
            if requests:
                guarded = guarded_edit(self.editor, requests, self.residual_guard)
                payload = guarded.payload
                if self.residual_guard > 0:
                    metrics.update(guarded.metrics())
            else:
                payload = self._empty_payload()
        metrics.update({"n_edits": payload.n_edits, "edit_seconds": time.perf_counter() - started})
        return payload, metrics

    # ------------------------------------------------------------------ layer-wise CollabEdit
    def check_layer_step(self, config: Mapping[str, Any]) -> int:
        """The ``layer_step`` of a fit config, checked against this client's layers, passes and settings."""
        step = int(config["layer_step"])
        n_layers = len(self.layer_specs)
        n_steps = int(config.get("layer_steps", n_layers))
        if n_steps < 1 or n_steps % n_layers or not 0 <= step < n_steps:
            raise ValueError(f"layer step {step} of {n_steps}, but this client edits {n_layers} layers "
                             f"(the steps of an edit round are passes x layers)")
        passes = getattr(getattr(self.editor, "config", None), "passes", 1)
        if n_steps != passes * n_layers:
            raise ValueError(f"the server walks the layers {n_steps // n_layers} time(s) per edit round, but this "
                             f"client's editor makes {passes} MEMIT pass(es): set the same passes on both")
        refused = [what for what, on in (("secure aggregation", self.secure_aggregation),
                                         ("conflict handling", self.conflict_agent is not None),
                                         ("the residual guard", self.residual_guard > 0)) if on]
        if refused:
            raise ValueError(f"layer-wise CollabEdit does not combine with {', '.join(refused)}")
        if not (hasattr(self.editor, "compute_targets") and hasattr(self.editor, "layer_payload")):
            raise TypeError(f"layer-wise CollabEdit needs a MEMIT editor (compute_targets, layer_payload), "
                            f"got {type(self.editor).__name__}")
        return step

    def edit_layer_step(self, round_start: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray],
                        config: Mapping[str, Any]) -> tuple[EditPayload, dict[str, Any]]:
        """Step ``layer_step`` of edit round ``server_round`` (module docstring): layer ``l_i``'s payload
        (``kkt`` and ``rkt``, no delta) on ``W0 + round_start + merged``."""
        edit_round = int(config.get("server_round", 1))
        step = self.check_layer_step(config)
        n_layers = len(self.layer_specs)
        started = time.perf_counter()
        requests = [case.request for case in self.cases_by_round.get(edit_round, [])]
        layer_index = step % n_layers  # pass step // n_layers
        spec = self.layer_specs[layer_index]
        metrics: dict[str, Any] = {"layer_step": step}
        if requests:
            targets, reused = self.round_targets(edit_round, requests, round_start)
            current = {name: update + merged[name] if name in merged else update for name, update in round_start.items()}
            with applied_update(self.model, current):
                layer = self.editor.layer_payload(requests, targets, layer_index)
            norms = (targets.z - targets.h_init).norm(dim=1).cpu().numpy() if step == 0 else np.zeros(0)
            payload = EditPayload(layers={spec.name: LayerPayload(delta=None, kkt=layer.kkt, rkt=layer.rkt)},
                                  n_edits=len(requests), residual_norms=norms)
            metrics["targets_reused"] = int(reused)
        else:
            payload = EditPayload(layers={spec.name: LayerPayload(delta=None, kkt=np.zeros((spec.d_in, spec.d_in)),
                                                                  rkt=np.zeros((spec.d_out, spec.d_in)))}, n_edits=0)
        metrics.update({"n_edits": payload.n_edits, "edit_seconds": time.perf_counter() - started})
        return payload, metrics

    def round_targets(self, edit_round: int, requests: Sequence[Any],
                      round_start: Mapping[str, np.ndarray]):
        """``(targets, reused)``: the requests' targets on ``W0 + round_start``, from :attr:`state` when it
        holds them for these requests and this round start, else optimised now and stored there."""
        key = targets_key(requests, round_start)
        meta = self.state.get(TARGETS_META)
        record = self.state.get(TARGETS_RECORD)
        if meta is not None and record is not None and meta.get("key") == key:
            from fedke.editing.memit import Targets

            targets = Targets(requests=_tuples(json.loads(str(meta["requests"]))),
                              z=torch.from_numpy(record["z"].numpy().copy()),
                              h_init=torch.from_numpy(record["h_init"].numpy().copy()),
                              signature=_tuples(json.loads(str(meta["signature"]))))
            return targets, True
        with applied_update(self.model, round_start):
            targets = self.editor.compute_targets(requests)
        self.state[TARGETS_RECORD] = ArrayRecord({"z": Array(targets.z.detach().cpu().numpy().astype(np.float64)),
                                                  "h_init": Array(targets.h_init.detach().cpu().numpy().astype(np.float64))})
        self.state[TARGETS_META] = ConfigRecord({"key": key, "edit_round": int(edit_round),
                                                 "requests": json.dumps(targets.requests),
                                                 "signature": json.dumps(targets.signature)})
        return targets, False

    def _conflict_requests(self, server_round: int, cases: Sequence[EditCase], config: Mapping[str, Any],
                           metrics: dict[str, Any]) -> list:
        """This round's requests under conflict handling (the global update is applied).

        1. Conflicts among the round's own cases are settled locally (Table 7, ``m1 = m2``).
        2. The server's decisions about earlier claims: losers withdraw, winners re-edit with
           augmentation.
        3. Claims go into ``metrics``: every kept case (``"hmac"``), or the earlier cases that fail
           on the global model (``"failures"``, with their count).
        """
        agent = self.conflict_agent
        kept, local_winners, local_losers = agent.resolve_locally(cases)
        earlier = self.cases_until(server_round - 1)
        reedit, withdrawn = agent.apply_decisions(config, earlier)
        requests = []
        for case in kept:
            requests += agent.requests_for(case) if case in local_winners else [case.request]
        for case in reedit:
            requests += agent.requests_for(case)
        if agent.mode == "hmac":
            metrics[CLAIMS_KEY] = agent.claims(kept)
        elif earlier:
            gone = {id(case) for case in withdrawn}
            failing = failing_cases(self.model, self.tokenizer, [c for c in earlier if id(c) not in gone])
            metrics[CLAIMS_KEY] = agent.claims(failing, failed=len(failing))
        metrics.update({"n_local_conflicts": len(local_losers), "n_reedited": len(reedit),
                        "n_withdrawn": len(withdrawn)})
        return requests

    def evaluate(self, parameters, config):
        return self.evaluate_update(self._update(parameters), config)

    def evaluate_update(self, update: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[float, int, dict[str, float]]:
        """``(1 - Score / 100, cases, metrics)`` of every case edited up to ``config["server_round"]``
        on ``W0 + update`` (the clients' own federated evaluation)."""
        server_round = int(config.get("server_round", 1))
        cases = self.cases_until(server_round)
        if not cases:
            return 0.0, 0, {}
        with applied_update(self.model, update):
            summary = evaluate_cases(self.model, self.tokenizer, cases).summary
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        return 1.0 - metrics.get("Score", 0.0) / 100.0, len(cases), metrics

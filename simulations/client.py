"""The fedke Flower client: a ``NumPyClient`` that wraps a knowledge editor and a model.

Each round it receives the cumulative update of the edited layers (never the full model),
applies it to its copy of the base model, edits its own requests for the round and replies
with the encoded payload (Delta, K K^T, R K^T per layer). Its requests and keys never leave it.
It evaluates its own requests on the global model when asked. The base model is restored bit
for bit after every call, so one loaded model can serve every client of a worker process.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.client import NumPyClient

from fedke.codec import LayerSpec, decode_update, encode_payload, encode_update, payload_nbytes
from fedke.data.records import EditCase
from fedke.editing.base import Editor
from fedke.editing.weights import applied_update
from fedke.eval import evaluate_cases
from fedke.payload import EditPayload, LayerPayload


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
    """

    def __init__(self, editor: Editor, model, tokenizer, cases_by_round: Mapping[int, Sequence[EditCase]], *,
                 wire_dtype: Any = np.float32) -> None:
        self.editor = editor
        self.model = model
        self.tokenizer = tokenizer
        self.cases_by_round = {int(k): list(v) for k, v in cases_by_round.items()}
        self.wire_dtype = np.dtype(wire_dtype)
        self.layer_specs = [LayerSpec(name, *shape) for name, shape in editor.layer_shapes().items()]

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
        server_round = int(config.get("server_round", 1))
        cases = self.cases_by_round.get(server_round, [])
        started = time.perf_counter()
        if cases:
            with applied_update(self.model, self._update(parameters)):
                payload = self.editor.edit([case.request for case in cases])
        else:
            payload = self._empty_payload()
        arrays = encode_payload(payload, dtype=self.wire_dtype)
        metrics = {"n_edits": payload.n_edits, "edit_seconds": time.perf_counter() - started,
                   "payload_bytes": payload_nbytes(arrays)}
        return arrays, payload.n_edits, metrics

    def evaluate(self, parameters, config):
        server_round = int(config.get("server_round", 1))
        cases = self.cases_until(server_round)
        if not cases:
            return 0.0, 0, {}
        with applied_update(self.model, self._update(parameters)):
            summary = evaluate_cases(self.model, self.tokenizer, cases).summary
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        return 1.0 - metrics.get("Score", 0.0) / 100.0, len(cases), metrics

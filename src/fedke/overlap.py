"""Knowledge overlap: the residual ``||r||`` as its detector, a client-side guard, and the repeat study.

CollabEdit section 4.2.1 (eq. 6): editing the same requests (same keys ``K``) again leaves the
residual ``R_new = R_old - Delta K = R_old - R_old K^T (A0 + K K^T)^-1 K``, which falls towards 0
as the edit is repeated. So a request whose residual against the current global model is (near)
zero is already in the model: re-submitting it only over-weights it (the overfitting the paper
warns about), which can hurt the *other* edits.

* :func:`guard_mask` / :func:`guarded_edit`: the client-side guard. A request is skipped when its
  residual norm ``||r_j||`` (the editor's :attr:`fedke.payload.EditPayload.residual_norms`,
  measured against the model the client was given, i.e. the current global model) is strictly
  below ``threshold``; the rest are edited as if the skipped ones had never been asked.
* :func:`repeat_residuals`: the Figure 3 study. The same requests are merged into the global
  model ``k = 1..K`` times with their targets ``z`` fixed at the first edit (the setting of
  eq. 6), and after each merge the residual ``||Z - H_k||_F`` of the actual model is measured,
  next to the eq. 6 prediction for the last edited layer (:func:`fedke.merge.residual_after_repeat`)
  and the residual the editor reports when it re-optimises the targets from scratch.

No module-level state; the model is always restored exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedke.data.records import EditCase, EditRequest
from fedke.payload import EditPayload, LayerPayload

log = logging.getLogger(__name__)

__all__ = ["GuardResult", "guard_mask", "guarded_edit", "repeat_residuals"]


def guard_mask(norms: Sequence[float] | np.ndarray, threshold: float | None) -> np.ndarray:
    """Which requests to keep: ``||r_j|| >= threshold`` (a request strictly below is skipped).

    ``threshold`` None or 0 keeps everything. Raises ValueError on a negative or non-finite
    threshold, or on negative / non-finite norms.
    """
    norms = np.asarray(norms, dtype=np.float64).reshape(-1)
    if norms.size and (not np.all(np.isfinite(norms)) or np.any(norms < 0)):
        raise ValueError("residual norms must be finite and non-negative")
    if threshold is None or threshold == 0:
        return np.ones(norms.shape, dtype=bool)
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"the residual guard threshold must be a finite non-negative number, got {threshold!r}")
    return norms >= threshold


@dataclass
class GuardResult:
    """What :func:`guarded_edit` returns: the payload of the kept requests and what was skipped."""

    payload: EditPayload
    keep: np.ndarray
    norms: np.ndarray  # every request's residual norm against the model as given

    @property
    def n_skipped(self) -> int:
        return int((~self.keep).sum())

    def metrics(self) -> dict[str, float]:
        skipped = self.norms[~self.keep]
        out: dict[str, float] = {"n_skipped": self.n_skipped, "n_requested": int(self.keep.size)}
        if skipped.size:
            out["skipped_residual_norm_max"] = float(skipped.max())
        return out


def empty_payload(layer_shapes: Mapping[str, tuple[int, int]]) -> EditPayload:
    """A payload of zeros that edits nothing (``n_edits = 0``)."""
    layers = {name: LayerPayload(np.zeros((d_out, d_in)), np.zeros((d_in, d_in)), np.zeros((d_out, d_in)))
              for name, (d_out, d_in) in layer_shapes.items()}
    return EditPayload(layers=layers, n_edits=0)


def guarded_edit(editor, requests: Sequence[EditRequest], threshold: float | None) -> GuardResult:
    """Edit ``requests`` but skip those already in the model (``||r_j|| < threshold``).

    The editor runs once on every request (that is how the residuals against the current model
    are measured); if some fall under the threshold it runs again on the others only, so the
    payload is exactly that of editing the kept requests alone. All skipped: an empty payload.
    The returned payload's ``residual_norms`` are the kept requests'.
    """
    requests = list(requests)
    if not requests:
        return GuardResult(empty_payload(editor.layer_shapes()), np.zeros(0, dtype=bool), np.zeros(0))
    payload = editor.edit(requests)
    norms = np.asarray(payload.residual_norms, dtype=np.float64).reshape(-1)
    if norms.size != len(requests):
        raise ValueError(f"the editor reported {norms.size} residual norms for {len(requests)} requests")
    keep = guard_mask(norms, threshold)
    if keep.all():
        return GuardResult(payload, keep, norms)
    if not keep.any():
        log.info("residual guard: all %d requests are already in the model; nothing to edit", len(requests))
        return GuardResult(empty_payload(editor.layer_shapes()), keep, norms)
    log.info("residual guard: skipping %d of %d requests (||r|| < %g)", int((~keep).sum()), len(requests), threshold)
    kept = [request for request, k in zip(requests, keep) if k]
    return GuardResult(editor.edit(kept), keep, norms)


# ----------------------------------------------------------------------------- Figure 3


@dataclass
class RepeatStudy:
    """Rows of :func:`repeat_residuals` (one per number of merges ``k``, ``k = 0`` before any)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def column(self, name: str) -> list[float]:
        return [row[name] for row in self.rows]


def repeat_residuals(editor, model, requests: Sequence[EditRequest], repeats: int, *,
                     merge: Callable[[Mapping[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                     evaluate: Callable[[], Mapping[str, float]] | None = None,
                     reoptimised: bool = True) -> RepeatStudy:
    """Merge the same edit ``repeats`` times into a global update and measure ``||R||`` after each.

    The targets ``Z`` are optimised once, on the model as given (eq. 6's setting). Repeat
    ``k = 1..repeats`` is one MEMIT pass of the requests against the current global model with
    those targets, in the editor's mode, and ``merge(update, deltas)`` folds its deltas into the
    global update (default: add them):

    * ``"decoupled"``: every layer's keys and residual ``(Z - H) / split_l`` come from the model
      as given (one-shot CollabEdit merging the same edit again);
    * ``"sequential"``: stock MEMIT, each layer sees the update its predecessors just wrote
      (layer-wise CollabEdit merging the same edit again). Every layer's step then solves for
      what is really left, and ``||R||`` falls monotonically where the decoupled split
      (``1/L + ... + 1`` times the residual in all) can overshoot.

    Row ``k`` holds, after ``k`` merges:

    * ``residual_norm``: ``||Z - H_k||_F`` at the last edited layer of the real model (requests
      as columns; ``H_k`` its output at the fact token);
    * ``residual_norm_eq6``: eq. 6 for the last layer alone, from ``Z - H_0`` and that layer's keys
      (:func:`fedke.merge.residual_after_repeat`);
    * ``residual_norm_reoptimised`` (when ``reoptimised``): ``||r||`` as the editor reports it
      for a fresh edit (targets re-optimised) against the same model, the guard's quantity;
    * ``evaluate()``'s metrics, if given, with the update applied.

    ``editor`` is a :class:`fedke.editing.MemitEditor` over ``model`` with ``passes = 1``.
    """
    from fedke.editing import applied_update
    from fedke.merge import residual_after_repeat

    requests = list(requests)
    if editor.config.passes != 1:
        raise ValueError(f"repeat_residuals makes one MEMIT pass per repeat; the editor has passes={editor.config.passes}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    last = editor.layer_names[-1]
    targets = editor.compute_targets(requests)
    eq6 = residual_after_repeat(editor.target_residuals(requests, targets).T, editor.keys(requests)[last],
                                editor.regularisers()[last], repeats)
    update: dict[str, np.ndarray] = {}
    study = RepeatStudy()
    for k in range(repeats + 1):
        with applied_update(model, update):
            residual = editor.target_residuals(requests, targets)  # (M, d)
            row = {"repeats": k, "residual_norm": float(np.linalg.norm(residual)),
                   "residual_norm_mean": float(np.linalg.norm(residual, axis=1).mean()),
                   "residual_norm_eq6": float(eq6[k])}
            if reoptimised:
                fresh = editor.compute_targets(requests)
                row["residual_norm_reoptimised"] = float((fresh.z - fresh.h_init).norm())
            if evaluate is not None:
                row.update(evaluate())
            deltas = editor.edit(requests, targets=targets).deltas() if k < repeats else {}
        study.rows.append(row)
        log.info("repeat %d: ||R|| = %.4g (eq. 6: %.4g)", k, row["residual_norm"], row["residual_norm_eq6"])
        if deltas:
            update = merge(update, deltas) if merge is not None else {
                name: update.get(name, 0.0) + delta for name, delta in deltas.items()}
    return study


def cases_requests(cases: Sequence[EditCase]) -> list[EditRequest]:
    return [case.request for case in cases]

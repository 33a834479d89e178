"""MEMIT (Meng et al., 2023) producing CollabEdit payloads: per layer Delta, K K^T and R K^T.

For requests j = 1..M and edited layers l_1 < ... < l_L:

1. **Targets.** One additive vector ``delta_j`` at the fact token of the last edited layer's
   output is optimised per request (as the reference's ``compute_z``; here many requests share each
   forward and backward pass) to maximise ``log p(target_new)`` over the request prompt and its
   context prefixes, plus ``kl_factor`` x KL(p || p_init) on ``"{subject} is a"`` and a weight
   decay, with ``||delta_j||`` clamped to ``clamp_norm_factor * ||h_j||``; request j stops once its
   loss is below ``loss_stop``. ``z_j = h_j + delta_j``. Each step runs only the blocks above the
   last edited layer and the LM head where the loss reads it.
2. **Keys** ``K_l`` (d_in x M): the edited projection's input at the fact token, averaged over
   the contexts as the reference groups them (the plain prompt 1/2, the prefixes 1/2).
3. **Residuals** ``R_l`` (d_out x M): ``(z - h_L(current model)) / (L - i)`` (``"remaining"``, the
   reference) or ``/ L`` (``"even"``).
4. **Solve** ``Delta_l = R_l K_l^T (lam C_l + K_l K_l^T)^-1`` in float64 by Cholesky.
5. **Passes** (``passes = P``, default 1 = MEMIT): steps 2-4 run P times with the targets of
   step 1 fixed, each pass on the model holding the earlier passes' update, and the deltas add
   up. Pass p is exactly "the same edit merged again" (CollabEdit eq. 6: the residual left by
   the earlier passes is solved for again), so the residual shrinks where the keys allow it.
   On a small model whose keys are crowded, one pass realises only part of each residual
   (MEMIT's solve is a compromise between requests sharing key directions); further passes
   trade more of the edit for more damage to neighbours.

Modes: ``"sequential"`` is stock MEMIT (each layer's update is written before the next layer's
keys and residual are computed); ``"decoupled"`` takes every layer's keys and residual from the
unedited model, as the CollabEdit authors' code does, which makes the CollabEdit merge of
client payloads equal Global-Edit of all their requests exactly.

The model is left exactly as it was: callers apply the returned payload's deltas themselves
(:func:`fedke.editing.weights.apply_update`).

Why one file of about 900 lines: it is one editor. Targets, keys and the solve share the editor's
model hooks, batching and settings; the forward passes of target optimisation live in
:mod:`fedke.editing.target_forward` and the maths in :mod:`fedke.merge`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from fedke.data.records import EditRequest, RecordError
from fedke.editing.presets import LayerPreset, get_module, preset_for
from fedke.editing.target_forward import (CHUNK_TOKENS, _ByWidth, _ReplayMismatch, _Rows, _TargetForward,
                                         _SuffixStack, _UpperStack, _WholeModel, _suffix_buckets, _width_groups)
from fedke.editing.weights import apply_update, layer_shape, revert_update
from fedke.merge import SingularSystemError, null_space_projector
from fedke.payload import EditPayload, LayerPayload

log = logging.getLogger(__name__)

Mode = Literal["decoupled", "sequential"]
FactToken = Literal["last", "subject_last"]
EarlyStop = Literal["loss", "nll"]
KlDirection = Literal["edited||initial", "initial||edited"]
KeyWeighting = Literal["grouped", "uniform"]
TargetForward = Literal["suffix", "upper", "full"]


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyper-parameters (names follow the reference's hparams where they exist).

    Parameters
    ----------
    layers: edited layer indices; ``None`` takes the preset's.
    mode: ``"decoupled"`` (keys and residuals from the unedited model) or ``"sequential"``.
    fact_token: ``"last"`` (the prompt's last token) or ``"subject_last"`` (the subject's last token).
    lam: ``mom2_update_weight``, the weight of C in ``lam C + K K^T``.
    knowledge_weight: ``alpha``, the weight of each preserved-knowledge key: the regulariser becomes
        ``A0 = lam C + alpha K0 K0^T``, ``K0`` the keys of facts the model already holds (at the fact
        token, as an edit computes keys; :meth:`MemitEditor.key_gram`), passed to the editor as
        ``knowledge_grams``. The paper's C0 is "the covariance of existing knowledge"; C over generic
        text weighs the few positions where facts are read very little (see the README's forgetting
        section). 0 (default) is MEMIT.
    cov_ridge: C is used as ``C + cov_ridge * (tr C / d_in) I``. Not in the reference: statistics
        over little text leave directions of (nearly) dead units with eigenvalues ~1e-15, and
        the solve then writes updates of norm ~1e6 into them (seen on the world model's layer 1).
        1e-2 bounds that and changes little where C is well conditioned; 0 is the reference.
    v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor: target optimisation.
    loss_stop: a request's target optimisation stops once its loss is below this.
    early_stop: ``"loss"`` (the reference: the request's whole loss, NLL + KL + weight decay) or
        ``"nll"`` (its mean target NLL alone; stops earlier, edits weaker).
    kl_direction: ``"edited||initial"`` (the reference and ROME's paper: KL(p || p_init) on
        ``kl_prompt``) or ``"initial||edited"`` (KL(p_init || p)).
    key_weighting: ``"grouped"`` (the reference: keys averaged within the groups ``["{}"]`` and
        the prefixes, then across the groups, so the plain prompt weighs 1/2 and each of n
        prefixes 1/(2n)) or ``"uniform"`` (every context 1/(n+1)).
    target_forward: ``"suffix"`` (the default: each optimisation step runs only the blocks above the
        last edited layer, from its output computed once, only on the positions from the batch's
        first fact token on, attending to the earlier positions' keys and values recorded once,
        and the LM head only where the loss reads it), ``"upper"`` (the same on every position)
        or ``"full"`` (the whole model every step). Each replay is checked against the whole
        model on the first batch and falls back to the next with a warning where it does not
        hold; all give the same targets up to float rounding. Under ``batch_invariant``,
        ``"suffix"`` runs in fixed-shape chunks of one (prefix, suffix) length bucket each.
    target_batch: requests whose targets are optimised together (memory; targets do not depend
        on it: each request's loss is its own).
    batch_invariant: run every forward of keys and targets in chunks of one fixed shape
        (``CHUNK_TOKENS`` tokens of one width: :func:`_width_groups`), so that a request's keys
        and targets are bit-for-bit the same whichever requests share its batch or client, and
        CollabEdit equals Global-Edit up to the wire's rounding. Off: the float32 rounding of a
        request's forward passes follows its batch (BLAS picks kernels by row count; the suffix
        replay's shapes follow the batch): targets of the same request then differ by ~1e-5
        between batches, and a request may stop a step earlier in one batch than in another, so
        CollabEdit's update is ~2e-6 (relative) from Global-Edit's on SmolLM2 at 20 edits and
        8e-4 at 200 (bench/results), for less target time.
    residual_split: ``"remaining"`` (reference: divide by the layers left) or ``"even"`` (by L).
    passes: how many times keys, residuals and solves run with the targets fixed (1: MEMIT).
    editor: ``"memit"``, or ``"alphaedit"`` (Fang et al., ICLR 2025): every layer's keys are
        projected onto the near-null space of its covariance C0 (``P``,
        :func:`fedke.merge.null_space_projector` at ``nullspace_threshold`` x the mean eigenvalue)
        and the regulariser is ``alpha I`` instead of ``lam C0`` (``alpha = alphaedit_l2`` x C0's
        mean eigenvalue: scale-free, like the threshold), so the update
        ``Delta = R K^T P (P K K^T P + alpha I)^-1`` leaves keys in C0's large directions alone. The
        payload's ``K K^T`` and ``R K^T`` are of the projected keys: CollabEdit merges them exactly,
        and its dynamic covariance (``sum K K^T`` of earlier rounds) is AlphaEdit's ``P C_p P``.
    nullspace_threshold: AlphaEdit's null space, relative to C0's mean eigenvalue.
    alphaedit_l2: AlphaEdit's ``alpha`` (its authors' ``L2``, absolute there), relative to C0's mean
        eigenvalue.
    kl_prompt: the essence prompt of the KL term.
    context_templates: prefixes, each holding ``{}`` for the prompt; ``None`` samples
        ``n_context`` prefixes of ``context_length`` tokens from the model (seeded).
    """

    layers: tuple[int, ...] | None = None
    mode: Mode = "decoupled"
    fact_token: FactToken = "last"
    lam: float = 300.0
    knowledge_weight: float = 0.0
    cov_ridge: float = 1e-2
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    early_stop: EarlyStop = "loss"
    kl_direction: KlDirection = "edited||initial"
    key_weighting: KeyWeighting = "grouped"
    target_forward: TargetForward = "suffix"
    target_batch: int = 64
    batch_invariant: bool = False
    residual_split: Literal["remaining", "even"] = "remaining"
    passes: int = 1
    editor: Literal["memit", "alphaedit"] = "memit"
    nullspace_threshold: float = 0.1
    alphaedit_l2: float = 100.0
    kl_prompt: str = "{} is a"
    context_templates: tuple[str, ...] | None = None
    n_context: int = 5
    context_length: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("decoupled", "sequential"):
            raise ValueError(f"mode must be 'decoupled' or 'sequential', got {self.mode!r}")
        if self.fact_token not in ("last", "subject_last"):
            raise ValueError(f"fact_token must be 'last' or 'subject_last', got {self.fact_token!r}")
        if self.residual_split not in ("remaining", "even"):
            raise ValueError(f"residual_split must be 'remaining' or 'even', got {self.residual_split!r}")
        if self.lam < 0:
            raise ValueError("lam must be non-negative")
        if not (np.isfinite(self.knowledge_weight) and self.knowledge_weight >= 0):
            raise ValueError(f"knowledge_weight must be finite and non-negative, got {self.knowledge_weight!r}")
        if self.cov_ridge < 0:
            raise ValueError("cov_ridge must be non-negative")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be a positive integer, got {self.passes!r}")
        for name, allowed in (("early_stop", ("loss", "nll")), ("kl_direction", ("edited||initial", "initial||edited")),
                              ("key_weighting", ("grouped", "uniform")), ("target_forward", ("suffix", "upper", "full"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.editor not in ("memit", "alphaedit"):
            raise ValueError(f"editor must be 'memit' or 'alphaedit', got {self.editor!r}")
        for name in ("nullspace_threshold", "alphaedit_l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(self.target_batch, bool) or not isinstance(self.target_batch, int) or self.target_batch < 1:
            raise ValueError(f"target_batch must be a positive integer, got {self.target_batch!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.context_templates is not None and not all("{}" in t for t in self.context_templates):
            raise ValueError("every context template must hold '{}' for the prompt")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EditInternals:
    """What an edit computed on the way: keys (d_in x M), residuals (d_out x M), targets (M x d)."""

    keys: dict[str, np.ndarray] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class Targets:
    """Optimised target vectors of a batch of requests (:meth:`MemitEditor.compute_targets`)."""

    requests: tuple[tuple[str, str, str], ...]  # (prompt, subject, target_new) of each request
    z: torch.Tensor  # (M, d_model) float64
    h_init: torch.Tensor  # (M, d_model) float64, the unedited outputs at the fact token
    signature: tuple
    #: forward passes each request's optimisation ran (the last without a backward); empty if unknown
    steps: tuple[int, ...] = field(default=(), compare=False)

    def subset(self, indices: Sequence[int]) -> "Targets":
        """The targets of the requests at ``indices`` (in that order): each request's target vector is
        optimised on its own, so a sub-batch of a sweep reuses them instead of optimising again."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < len(self.requests) for i in indices):
            raise IndexError(f"target indices must be in 0..{len(self.requests) - 1}")
        steps = tuple(self.steps[i] for i in indices) if self.steps else ()
        return Targets(tuple(self.requests[i] for i in indices), self.z[indices], self.h_init[indices], self.signature,
                       steps)


@dataclass
class _Encoded:
    """Token ids of a batch of prompts and where to read / write at each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor
    owner: torch.Tensor  # request index of each row
    target_positions: list[list[int]] = field(default_factory=list)
    target_ids: list[list[int]] = field(default_factory=list)


@dataclass
class _TargetBatch:
    """The rows of one target-optimisation batch: each request's context prompts (+ target tokens),
    then one KL prompt per request; the loss reads first every target token's position, then each
    KL row's fact token."""

    requests: torch.Tensor  # (a,) indices of the batch's requests in the caller's list
    rows: _Rows
    row_owner: torch.Tensor  # (R,) 0..a-1
    n_rewrite: int  # rows [0, n_rewrite) are context prompts, the rest KL prompts
    target_row: torch.Tensor  # (n_target,) the row of each target token
    target_tokens: torch.Tensor
    tokens_per_row: torch.Tensor
    prompts_per_request: torch.Tensor
    first_rows: torch.Tensor  # (a,) each request's plain-prompt row

    @property
    def n_target(self) -> int:
        return int(self.target_tokens.shape[0])


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it reads has been computed."""


class MemitEditor:
    """MEMIT over any HF causal LM, through a :class:`LayerPreset`.

    ``covariances`` maps each edited layer's module name to C = E[k k^T] (see
    :func:`fedke.stats.layer_covariances`). ``knowledge_grams`` (needed when
    ``config.knowledge_weight > 0``) maps it to ``K0 K0^T``, the unnormalised sum over the keys of
    facts to preserve (:meth:`key_gram`). The editor holds no global state: several editors over
    several models can live in one process.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, covariances: Mapping[str, np.ndarray],
                 config: MemitConfig | None = None, preset: LayerPreset | None = None, *,
                 knowledge_grams: Mapping[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or MemitConfig()
        self.preset = preset.with_layers(self.config.layers) if preset is not None and self.config.layers else (
            preset or preset_for(model, self.config.layers))
        self.layer_names = [self.preset.mlp_out_name(layer) for layer in self.preset.layers]
        missing = [name for name in self.layer_names if name not in covariances]
        if missing:
            raise ValueError(f"no covariance statistics for layer(s) {missing}")
        self.covariances = {name: np.asarray(covariances[name], dtype=np.float64) for name in self.layer_names}
        for name in self.layer_names:
            d_in = layer_shape(model, name)[1]
            if self.covariances[name].shape != (d_in, d_in):
                raise ValueError(f"covariance for layer {name!r} has shape {self.covariances[name].shape}, "
                                 f"the layer's input has d_in={d_in}")
        self.knowledge_grams: dict[str, np.ndarray] = {}
        if self.config.knowledge_weight > 0:
            if knowledge_grams is None:
                raise ValueError(f"knowledge_weight={self.config.knowledge_weight} needs knowledge_grams "
                                 "(K0 K0^T per edited layer, e.g. from MemitEditor.key_gram)")
            missing = [name for name in self.layer_names if name not in knowledge_grams]
            if missing:
                raise ValueError(f"no knowledge_grams for layer(s) {missing}")
            for name in self.layer_names:
                gram = np.asarray(knowledge_grams[name], dtype=np.float64)
                if gram.shape != self.covariances[name].shape:
                    raise ValueError(f"knowledge_grams[{name!r}] has shape {gram.shape}, "
                                     f"expected {self.covariances[name].shape}")
                self.knowledge_grams[name] = gram
        self._context_templates: tuple[str, ...] | None = self.config.context_templates
        #: AlphaEdit's null-space projector per layer (``editor = "alphaedit"``), else empty.
        self.key_projectors: dict[str, torch.Tensor] = {}
        if self.config.editor == "alphaedit":
            if self.config.knowledge_weight > 0:
                raise ValueError("knowledge_weight adds K0 K0^T to MEMIT's regulariser; AlphaEdit protects "
                                 "knowledge by its projection instead (use one or the other)")
            for name, cov in self.covariances.items():
                try:
                    projector = null_space_projector(cov, self.config.nullspace_threshold)
                except ValueError as error:
                    raise ValueError(f"layer {name!r}: {error}") from None
                self.key_projectors[name] = torch.as_tensor(projector, device=self.device)

    # ------------------------------------------------------------------ public API
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def regularisers(self) -> dict[str, np.ndarray]:
        """``A0_l = lam * C_l`` (``+ alpha * K0 K0^T`` with ``knowledge_weight``; AlphaEdit:
        ``alpha * I``): what a CollabEdit server needs to merge this editor's payloads."""
        if self.config.editor == "alphaedit":  # alpha relative to C0's mean eigenvalue, as the null space
            return {name: self.config.alphaedit_l2 * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0])
                    for name, cov in self.covariances.items()}
        regs = {name: self.config.lam * _ridged(cov, self.config.cov_ridge) for name, cov in self.covariances.items()}
        for name, gram in self.knowledge_grams.items():
            regs[name] = regs[name] + self.config.knowledge_weight * gram
        return regs

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: layer_shape(self.model, name) for name in self.layer_names}

    def context_templates(self) -> tuple[str, ...]:
        if self._context_templates is None:
            self._context_templates = sample_context_templates(
                self.model, self.tokenizer, self.config.n_context, self.config.context_length, self.config.seed)
        return self._context_templates

    def context_weights(self) -> tuple[float, ...]:
        """The weight of each context template in a key (``key_weighting``; they sum to 1).

        ``"grouped"`` (the reference's ``[["{}"], prefixes]``): the mean over each group, then over
        the groups, so ``"{}"`` weighs 1/2 and each of n prefixes 1/(2n). ``"uniform"``: 1/(n+1) each.
        """
        templates = self.context_templates()
        if self.config.key_weighting == "uniform":
            return tuple(1.0 / len(templates) for _ in templates)
        plain = [t == "{}" for t in templates]
        groups = [size for size in (sum(plain), len(templates) - sum(plain)) if size]
        return tuple(1.0 / (len(groups) * (sum(plain) if is_plain else len(templates) - sum(plain)))
                     for is_plain in plain)

    def edit(self, requests: Sequence[EditRequest], *, regularisers: Mapping[str, np.ndarray] | None = None,
             targets: "Targets | None" = None, progress: bool = False) -> EditPayload:
        """Edit ``requests`` and return the payload; the model is left unchanged.

        ``regularisers`` overrides ``lam * C`` per layer (e.g. the dynamic covariance
        ``beta0 lam C0 + beta1 sum K K^T`` of multi-round CollabEdit). ``targets`` reuses the
        result of :meth:`compute_targets` for these requests on this model (a lambda or mode
        sweep then optimises the target vectors once).
        """
        return self.edit_with_internals(requests, regularisers=regularisers, targets=targets, progress=progress)[0]

    def compute_targets(self, requests: Sequence[EditRequest], *, progress: bool = False) -> "Targets":
        """Step 1 alone: the target vectors ``z_j`` (and ``h_j``) of ``requests`` on the current model.

        They depend on the requests, the model's current weights, the last edited layer, the
        fact token and the target-optimisation settings, but not on ``lam``, the mode, the
        residual split or the other edited layers.
        """
        requests = list(requests)
        if not requests:
            raise ValueError("no edit requests")
        self._check_requests(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            z, h_init, steps = self._compute_targets(requests, progress=progress)
        finally:
            self.model.train(was_training)
        return Targets(_request_keys(requests), z, h_init, self._target_signature(), steps)

    def _check_targets(self, requests: Sequence[EditRequest], targets: "Targets") -> None:
        if targets.requests != _request_keys(requests):
            raise ValueError("targets were computed for other requests (or another order)")
        if targets.signature != self._target_signature():
            raise ValueError("targets were computed with other target settings (last layer, fact token, "
                             "optimisation hyper-parameters or context templates)")

    def _target_signature(self) -> tuple:
        cfg = self.config
        return (self.preset.layers[-1], cfg.fact_token, cfg.v_num_grad_steps, cfg.v_lr, cfg.v_weight_decay,
                cfg.clamp_norm_factor, cfg.kl_factor, cfg.loss_stop, cfg.early_stop, cfg.kl_direction, cfg.kl_prompt,
                self.context_templates())

    def keys(self, requests: Sequence[EditRequest], *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The keys ``K`` (d_in x M, float64) of every edited layer for ``requests``, as an edit
        computes them (input of the layer at the fact token, averaged over the context prefixes);
        in batches of ``batch_size`` requests. The model is not changed."""
        self._check_requests(requests)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.layer_names}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(requests), batch_size):
                    keys, _ = self._keys_and_outputs(list(requests[start:start + batch_size]))
                    for name in self.layer_names:
                        parts[name].append(keys[name].cpu().numpy())
        finally:
            self.model.train(was_training)
        return {name: np.concatenate(chunks, axis=1) for name, chunks in parts.items()}

    def key_gram(self, requests: Sequence[EditRequest], *, batch_size: int = 256,
                 progress: bool = False) -> dict[str, np.ndarray]:
        """``K K^T = sum_j k_j k_j^T`` (float64, ``d_in x d_in``) of every edited layer over the keys
        of ``requests`` (as :meth:`keys` computes them), accumulated batch by batch: memory stays
        ``O(d_in^2)`` however many requests. Over facts the model should keep, this is the
        ``knowledge_grams`` of :class:`MemitConfig`'s ``knowledge_weight``."""
        from tqdm.auto import tqdm

        grams = {name: np.zeros_like(self.covariances[name]) for name in self.layer_names}
        starts = range(0, len(requests), batch_size)
        for start in tqdm(starts, desc="knowledge keys", unit="batch", disable=not progress):
            for name, keys in self.keys(requests[start:start + batch_size], batch_size=batch_size).items():
                grams[name] += keys @ keys.T
        return grams

    def edit_with_internals(self, requests: Sequence[EditRequest], *,
                            regularisers: Mapping[str, np.ndarray] | None = None,
                            targets: "Targets | None" = None,
                            progress: bool = False) -> tuple[EditPayload, EditInternals]:
        """:meth:`edit`, also returning the keys ``K_l``, residuals ``R_l`` and targets ``z``.

        These never leave the client in a federation; they are for tests and privacy studies.
        """
        requests = list(requests)
        if not requests:
            raise ValueError("no edit requests")
        self._check_requests(requests)
        if targets is not None:
            self._check_targets(requests, targets)
        regs = dict(self.regularisers())
        if regularisers is not None:
            regs.update({name: np.asarray(a, dtype=np.float64) for name, a in regularisers.items()})
        was_training = self.model.training
        self.model.eval()
        applied = []
        internals = EditInternals()
        try:
            if targets is None:
                targets, h_init, _ = self._compute_targets(requests, progress=progress)
            else:
                targets, h_init = targets.z.to(self.device), targets.h_init.to(self.device)
            internals.targets = targets.cpu().numpy()
            residual_norms = (targets - h_init).norm(dim=1).cpu().numpy().astype(np.float64)
            passes: list[dict[str, LayerPayload]] = []
            n_layers = len(self.layer_names)
            for _ in range(self.config.passes):
                layers: dict[str, LayerPayload] = {}
                keys_all = current_all = None
                for i, name in enumerate(self.layer_names):
                    if self.config.mode == "sequential" or keys_all is None:
                        keys_all, current_all = self._keys_and_outputs(requests)
                    keys = self._solve_keys(name, keys_all[name])  # (d_in, M) float64
                    remaining = n_layers - i if self.config.residual_split == "remaining" else n_layers
                    residuals = (targets - current_all).T.to(torch.float64) / remaining  # (d_out, M)
                    layers[name] = _solve_layer(residuals, keys, torch.as_tensor(regs[name], device=keys.device), name)
                    if not passes:  # the internals are the first pass's
                        internals.keys[name] = keys.cpu().numpy()
                        internals.residuals[name] = residuals.cpu().numpy()
                    if self.config.mode == "sequential":
                        applied.append(apply_update(self.model, {name: layers[name].delta}))
                if self.config.mode == "decoupled" and len(passes) + 1 < self.config.passes:
                    applied.append(apply_update(self.model, {name: layer.delta for name, layer in layers.items()}))
                passes.append(layers)
            layers = passes[0] if len(passes) == 1 else _sum_passes(passes, regs)
            payload = EditPayload(layers=layers, n_edits=len(requests), residual_norms=residual_norms)
            return payload, internals
        finally:
            for record in reversed(applied):
                revert_update(self.model, record)
            self.model.train(was_training)

    def target_residuals(self, requests: Sequence[EditRequest], targets: "Targets") -> np.ndarray:
        """``z_j - h_j`` for each request (rows, ``(M, d_model)`` float64): what an edit still has to
        write at the last edited layer's output, on the model as it is now (the residual of
        CollabEdit eq. 6 once the edit has been merged). The model is not changed."""
        requests = list(requests)
        self._check_targets(requests, targets)
        _, current = self._keys_and_outputs_in_eval(requests)
        return (targets.z.to(self.device) - current).cpu().numpy()

    def layer_payload(self, requests: Sequence[EditRequest], targets: "Targets", layer_index: int, *,
                      regulariser: np.ndarray | None = None) -> LayerPayload:
        """One layer of a sequential edit, on the model as it is now (earlier layers already updated).

        Keys ``K_l`` and the residual ``R_l = (z - h_L) / (L - i)`` (or ``/ L`` with the even split)
        are read from the current model; ``Delta_l = R_l K_l^T (A0 + K_l K_l^T)^-1``. Stock MEMIT is
        this for ``i = 0..L-1``, writing each layer's update before the next call. Summing the
        ``K K^T`` and ``R K^T`` of several clients' calls on the same (merged) model gives exactly
        the sums of one call over all their requests: the layer-wise CollabEdit protocol
        (:func:`fedke.layerwise.layerwise_collab_edit`).
        """
        requests = list(requests)
        if not requests:
            raise ValueError("no edit requests")
        if not 0 <= layer_index < len(self.layer_names):
            raise ValueError(f"layer_index must be in 0..{len(self.layer_names) - 1}, got {layer_index}")
        self._check_targets(requests, targets)
        name = self.layer_names[layer_index]
        reg = self.regularisers()[name] if regulariser is None else np.asarray(regulariser, dtype=np.float64)
        keys_all, current = self._keys_and_outputs_in_eval(requests)
        n_layers = len(self.layer_names)
        remaining = n_layers - layer_index if self.config.residual_split == "remaining" else n_layers
        residuals = (targets.z.to(self.device) - current).T.to(torch.float64) / remaining
        return _solve_layer(residuals, self._solve_keys(name, keys_all[name]), torch.as_tensor(reg, device=self.device), name)

    def _solve_keys(self, name: str, keys: torch.Tensor) -> torch.Tensor:
        """The keys a layer's solve uses: ``K``, or AlphaEdit's ``P K``."""
        projector = self.key_projectors.get(name)
        return keys if projector is None else projector.to(keys.dtype) @ keys

    # ------------------------------------------------------------------ checks
    def _check_requests(self, requests: Sequence[EditRequest]) -> None:
        unk = getattr(self.tokenizer, "unk_token_id", None)
        for request in requests:
            where = f"edit request {request.case_id!r}"
            if not request.target_new.strip():
                raise RecordError(f"{where}: empty target_new")
            ids = self._target_ids(request.target_new)
            if not ids:
                raise RecordError(f"{where}: target_new {request.target_new!r} tokenises to nothing")
            if unk is not None and unk in ids:
                raise RecordError(f"{where}: target_new {request.target_new!r} is unknown to the tokenizer")

    def _target_ids(self, target: str) -> list[int]:
        return self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ tokenisation
    def _lookup_index(self, template: str, subject: str, prompt_len: int) -> int:
        """Fact-token position in ``template.format(subject)`` (which has ``prompt_len`` tokens)."""
        if self.config.fact_token == "last":
            return prompt_len - 1
        prefix = template[: template.index("{}")]
        n_through_subject = len(self.tokenizer((prefix + subject).rstrip())["input_ids"])
        return n_through_subject - 1

    def _encode(self, templates: list[str], subjects: list[str], owners: list[int],
                targets: list[list[int]] | None = None) -> _Encoded:
        """Encode ``template.format(subject)`` (+ all but the last target token when ``targets``)."""
        rows, lookups, positions, target_ids = [], [], [], []
        for k, (template, subject) in enumerate(zip(templates, subjects)):
            prompt_ids = self.tokenizer(template.format(subject))["input_ids"]
            lookups.append(self._lookup_index(template, subject, len(prompt_ids)))
            if targets is not None:
                target = targets[k]
                positions.append([len(prompt_ids) - 1 + t for t in range(len(target))])
                target_ids.append(target)
                prompt_ids = prompt_ids + target[:-1]
            rows.append(prompt_ids)
        width = _bucket(max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
        device = self.device
        return _Encoded(input_ids.to(device), attention.to(device), torch.tensor(lookups, device=device),
                        torch.tensor(owners, device=device), positions, target_ids)

    def _prompts_with_context(self, requests: Sequence[EditRequest]) -> tuple[list[str], list[str], list[int]]:
        templates, subjects, owners = [], [], []
        for j, request in enumerate(requests):
            for context in self.context_templates():
                templates.append(context.format(request.prompt) if context != "{}" else request.prompt)
                subjects.append(request.subject)
                owners.append(j)
        return templates, subjects, owners

    # ------------------------------------------------------------------ step 1: targets
    def _compute_targets(self, requests: Sequence[EditRequest],
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """z_j and h_j of every request (both (M, d_model) float64) and the forward passes each ran,
        ``target_batch`` requests at a time. Each request's loss is its own, so the batches do not
        change the targets."""
        size = self.config.target_batch
        parts = [self._optimise_targets(requests[start:start + size], progress)
                 for start in range(0, len(requests), size)]
        return (torch.cat([z for z, _, _ in parts]), torch.cat([h for _, h, _ in parts]),
                tuple(n for _, _, steps in parts for n in steps))

    def _target_batch(self, requests: Sequence[EditRequest], indices: Sequence[int]) -> "_TargetBatch":
        """The rows of ``requests[indices]``: each context prompt + target, then each KL prompt."""
        cfg = self.config
        templates, subjects, owners = self._prompts_with_context([requests[i] for i in indices])
        targets = [self._target_ids(requests[indices[j]].target_new) for j in owners]
        rewrite = self._encode(templates, subjects, owners, targets)
        kl = self._encode([cfg.kl_prompt] * len(indices), [requests[i].subject for i in indices], list(range(len(indices))))
        input_ids, attention = _concat_padded(rewrite, kl, self.tokenizer)
        n_rewrite = rewrite.input_ids.shape[0]
        target_row = [r for r in range(n_rewrite) for _ in rewrite.target_positions[r]]
        target_pos = [pos for r in range(n_rewrite) for pos in rewrite.target_positions[r]]
        target_tok = [tok for r in range(n_rewrite) for tok in rewrite.target_ids[r]]
        device = self.device
        row_of_target = torch.tensor(target_row, device=device)
        return _TargetBatch(
            requests=torch.tensor(list(indices), device=device),
            rows=_Rows(input_ids, attention, lookups=torch.cat([rewrite.lookup, kl.lookup]),
                       loss_rows=torch.cat([row_of_target,
                                            torch.arange(n_rewrite, n_rewrite + len(indices), device=device)]),
                       loss_positions=torch.cat([torch.tensor(target_pos, device=device), kl.lookup])),
            row_owner=torch.cat([rewrite.owner, kl.owner]), n_rewrite=n_rewrite,
            target_row=row_of_target, target_tokens=torch.tensor(target_tok, device=device),
            tokens_per_row=torch.bincount(row_of_target, minlength=n_rewrite).to(torch.float64),
            prompts_per_request=torch.bincount(rewrite.owner, minlength=len(indices)).to(torch.float64),
            first_rows=_first_rows(rewrite.owner, len(indices)))

    @property
    def _chunk_tokens(self) -> int:
        """Tokens per fixed-shape chunk of rows (0: one forward per width): ``batch_invariant``."""
        return CHUNK_TOKENS if self.config.batch_invariant else 0

    def _target_forward(self, batch: "_TargetBatch") -> "_TargetForward":
        mode = self.config.target_forward
        if mode == "suffix":
            try:
                if self.config.batch_invariant:  # fixed-shape chunks of one (prefix, suffix) bucket each
                    return _ByWidth(lambda part, first: _SuffixStack(self.model, self.preset, part, check=first,
                                                                     fixed_shapes=True),
                                    batch.rows, self._chunk_tokens,
                                    grouping=lambda rows: _suffix_buckets(rows, self._chunk_tokens))
                return _SuffixStack(self.model, self.preset, batch.rows)
            except _ReplayMismatch as err:
                log.warning("target optimisation cannot use the suffix replay: %s", err)
                mode = "upper"
        if mode == "upper":
            try:
                return _ByWidth(lambda part, first: _UpperStack(self.model, self.preset, part, check=first,
                                                                fixed_shapes=self.config.batch_invariant),
                                batch.rows, self._chunk_tokens)
            except _ReplayMismatch as err:
                log.warning("target optimisation runs the whole model every step: %s", err)
        return _ByWidth(lambda part, _first: _WholeModel(self.model, self.preset, part), batch.rows, self._chunk_tokens)

    def _optimise_targets(self, requests: Sequence[EditRequest],
                          progress: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """MEMIT's ``compute_z`` for a batch of requests at once, each with its own loss.

        Per request j, each step: ``NLL_j`` (the target's mean token NLL, averaged over the context
        prompts) + ``kl_factor * KL_j`` (on ``kl_prompt`` at the fact token) + ``v_weight_decay *
        ||delta_j|| / ||h_j||^2``; Adam on ``delta_j``, then ``||delta_j|| <= clamp_norm_factor *
        ||h_j||``. Request j stops once its loss (``early_stop``) is below ``loss_stop``: it leaves
        the batch, so later steps compute only the requests still optimised.
        """
        cfg = self.config
        m = len(requests)
        device = self.device
        delta = torch.zeros(m, _block_output_dim(self.model), device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        done = torch.zeros(m, dtype=torch.bool, device=device)
        passes = torch.zeros(m, dtype=torch.long, device=device)
        h_init = kl_init = None
        requires_grad = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        batch = forward = None
        try:
            for step in range(cfg.v_num_grad_steps):
                active = (~done).nonzero().flatten().tolist()
                if batch is None or len(active) <= 0.75 * len(batch.requests):  # drop finished requests' rows
                    batch = self._target_batch(requests, active)
                    forward = self._target_forward(batch)
                    if h_init is None:  # the first batch holds every request
                        h_init = forward.h_lookup[batch.first_rows].to(torch.float64)
                        kl_init = forward.initial_logits[batch.n_target:].float().log_softmax(-1)
                mine = batch.requests
                passes[mine[~done[mine]]] += 1
                optimizer.zero_grad()
                log_probs = forward(delta[mine][batch.row_owner]).float().log_softmax(-1)
                token_lp = log_probs[: batch.n_target].gather(1, batch.target_tokens[:, None])[:, 0].to(torch.float64)
                row_nll = -torch.zeros(batch.n_rewrite, dtype=torch.float64, device=device).index_add(
                    0, batch.target_row, token_lp) / batch.tokens_per_row
                nll = torch.zeros(len(mine), dtype=torch.float64, device=device).index_add(
                    0, batch.row_owner[: batch.n_rewrite], row_nll) / batch.prompts_per_request
                kl_lp, kl0 = log_probs[batch.n_target:], kl_init[mine]
                if cfg.kl_direction == "edited||initial":  # KL(p || p_init), the reference's kl_div(init, p)
                    kl = (kl_lp.exp() * (kl_lp - kl0)).sum(-1).to(torch.float64)
                else:  # KL(p_init || p)
                    kl = (kl0.exp() * (kl0 - kl_lp)).sum(-1).to(torch.float64)
                h_norm = h_init[mine].norm(dim=1)
                weight_decay = cfg.v_weight_decay * (delta[mine].norm(dim=1).to(torch.float64) / h_norm ** 2)
                loss = nll + cfg.kl_factor * kl + weight_decay
                finished = (loss if cfg.early_stop == "loss" else nll).detach() < cfg.loss_stop
                done[mine[finished]] = True
                if progress:
                    log.info("target step %d: nll %.3f (max %.3f), %d/%d done", step, float(nll.detach().mean()),
                             float(nll.detach().max()), int(done.sum()), m)
                if bool(done.all()) or step == cfg.v_num_grad_steps - 1:
                    break
                loss[~finished].sum().backward()
                frozen = delta.detach()[done].clone()
                optimizer.step()
                with torch.no_grad():
                    delta[done] = frozen  # finished requests keep their target (Adam's momentum would move them)
                    max_norm = cfg.clamp_norm_factor * h_init.norm(dim=1).to(delta.dtype)  # ||delta_j|| <= c ||h_j||
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                    delta.mul_(scale.unsqueeze(1))
        finally:
            for p, flag in zip(self.model.parameters(), requires_grad):
                p.requires_grad_(flag)
        return h_init + delta.detach().to(torch.float64), h_init, tuple(passes.tolist())

    # ------------------------------------------------------------------ steps 2-3: keys, current outputs
    def _keys_and_outputs_in_eval(self, requests: Sequence[EditRequest]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_keys_and_outputs` with the model in eval mode (its mode restored after)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._keys_and_outputs(requests)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _keys_and_outputs(self, requests: Sequence[EditRequest]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Keys (d_in x M, weighted over contexts: :meth:`context_weights`) of every edited layer,
        and the last edited block's output (M x d_model) at the fact token of the plain prompt.

        Rows run in groups of their own width (:func:`_width_groups`); under ``batch_invariant``
        a request's keys do not depend on which requests share its batch."""
        templates, subjects, owners = self._prompts_with_context(requests)
        ctx = self._encode(templates, subjects, owners)
        inputs, outputs = self._read_at_fact_tokens(ctx)
        weights = torch.tensor(self.context_weights(), dtype=torch.float64, device=self.device)
        row_weight = weights.repeat(len(requests)).unsqueeze(1)  # rows are request-major, contexts in order
        keys = {}
        for name in self.layer_names:
            summed = torch.zeros(len(requests), inputs[name].shape[1], dtype=torch.float64, device=self.device)
            keys[name] = summed.index_add(0, ctx.owner, inputs[name] * row_weight).T.contiguous()
        contexts = self.context_templates()
        if "{}" in contexts:  # the plain prompt is one of the contexts: its row already ran
            return keys, outputs[_first_rows(ctx.owner, len(requests)) + contexts.index("{}")]
        plain = self._encode([r.prompt for r in requests], [r.subject for r in requests], list(range(len(requests))))
        return keys, self._read_at_fact_tokens(plain)[1]

    def _read_at_fact_tokens(self, encoded: _Encoded) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each edited layer's input (rows x d_in) and the last edited block's output (rows x d) at
        each row's fact token, float64, the model run only as far as that block."""
        n_rows = encoded.input_ids.shape[0]
        inputs: dict[str, torch.Tensor] = {}
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        block = get_module(self.model, self.preset.block_name(self.preset.layers[-1]))
        for members, width, padded in _width_groups(encoded.attention_mask, self._chunk_tokens):
            at = (torch.arange(len(padded), device=self.device), encoded.lookup[padded])
            n = len(members)

            def capture(name: str):
                def hook(_module, args):
                    value = args[0][at][:n].to(torch.float64)
                    if name not in inputs:
                        inputs[name] = torch.empty(n_rows, value.shape[1], dtype=torch.float64, device=self.device)
                    inputs[name][members] = value
                return hook

            def grab(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                outputs.append((members, hidden[at][:n].to(torch.float64)))

            handles = [get_module(self.model, name).register_forward_pre_hook(capture(name)) for name in self.layer_names]
            handles.append(block.register_forward_hook(grab))
            try:
                self._forward_through_last_layer(encoded.input_ids[padded, :width], encoded.attention_mask[padded, :width])
            finally:
                for handle in handles:
                    handle.remove()
        output = torch.empty(n_rows, outputs[0][1].shape[1], dtype=torch.float64, device=self.device)
        for members, value in outputs:
            output[members] = value
        return inputs, output

    def _forward_through_last_layer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the model only as far as the last edited block: keys and ``h`` are read there, so the
        blocks above it and the LM head (logits over the whole vocabulary at every position) would
        be wasted. The forward is cut by an exception raised from a hook on that block."""
        def stop(_module, _inputs, _output):
            raise _StopForward

        handle = get_module(self.model, self.preset.block_name(self.preset.layers[-1])).register_forward_hook(stop)
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()


# ---------------------------------------------------------------------- helpers
def _request_keys(requests: Sequence[EditRequest]) -> tuple[tuple[str, str, str], ...]:
    return tuple((r.prompt, r.subject, r.target_new) for r in requests)


def _ridged(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``C + ridge * (tr C / d) I``."""
    if ridge == 0:
        return cov
    return cov + ridge * (np.trace(cov) / cov.shape[0]) * np.eye(cov.shape[0])


def _solve_layer(residuals: torch.Tensor, keys: torch.Tensor, regulariser: torch.Tensor, name: str) -> LayerPayload:
    """Delta = R K^T (A0 + K K^T)^-1 by Cholesky, float64; returns the layer's payload.

    A system that is not positive definite raises :class:`fedke.merge.SingularSystemError` naming
    the layer (the merge's policy: no fallback, no inverse).
    """
    kkt = keys @ keys.T
    rkt = residuals @ keys.T
    gram = regulariser.to(torch.float64) + kkt
    gram = 0.5 * (gram + gram.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise SingularSystemError(f"layer {name!r}: A0 + K K^T is not positive definite (Cholesky failed at "
                                  f"order {int(info)}); check the covariance statistics and lam")
    delta = torch.cholesky_solve(rkt.T, factor).T  # gram symmetric: X gram = rkt  <=>  gram X^T = rkt^T
    return LayerPayload(delta=delta.cpu().numpy(), kkt=kkt.cpu().numpy(), rkt=rkt.cpu().numpy())


def _sum_passes(passes: Sequence[Mapping[str, LayerPayload]], regularisers: Mapping[str, np.ndarray]) -> dict[str, LayerPayload]:
    """One payload for several passes: ``Delta = sum_p Delta_p``, the first pass's ``K K^T`` and
    ``R K^T := Delta (A0 + K K^T)``, so that the normal equations of a payload hold.

    Merging such payloads one-shot (CollabEdit from the sums) gives back ``Delta`` for one client
    but only approximates Global-Edit with passes for several: pass p of Global-Edit sees every
    client's earlier passes. The exact federated version exchanges once per pass
    (:mod:`fedke.layerwise`)."""
    out = {}
    for name, first in passes[0].items():
        delta = np.sum([layers[name].delta for layers in passes], axis=0)
        out[name] = LayerPayload(delta=delta, kkt=first.kkt, rkt=delta @ (np.asarray(regularisers[name]) + first.kkt))
    return out


PAD_MULTIPLE = 32


def _bucket(length: int) -> int:
    """Pad widths to a multiple of 32 tokens: a request's forward pass then does not depend on
    the length of its batch mates' prompts (so batched edits equal edits made alone)."""
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def _first_rows(owner: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the first row of each request (its context "{}", the plain prompt)."""
    first = torch.full((n,), -1, dtype=torch.long, device=owner.device)
    for row in range(len(owner) - 1, -1, -1):
        first[owner[row]] = row
    return first


def _concat_padded(a: _Encoded, b: _Encoded, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([widen(a.input_ids, pad), widen(b.input_ids, pad)]),
            torch.cat([widen(a.attention_mask, 0), widen(b.attention_mask, 0)]))


def _block_output_dim(model: torch.nn.Module) -> int:
    config = model.config
    for attr in ("n_embd", "hidden_size", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ValueError("cannot tell the hidden size of this model")


@torch.no_grad()
def sample_context_templates(model: torch.nn.Module, tokenizer, n: int, length: int, seed: int) -> tuple[str, ...]:
    """MEMIT's context prefixes: ``"{}"`` plus ``n`` short texts sampled from the model itself
    (top-5 sampling with a seeded generator, so the same seed gives the same prefixes)."""
    templates = ["{}"]
    if n <= 0:
        return tuple(templates)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer("The")["input_ids"][0]
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    for _ in range(length):
        logits = model(input_ids=ids).logits[:, -1].float().cpu()
        top = logits.topk(5, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, top.indices.gather(1, choice).to(device)], dim=1)
    for row in ids[:, 1:] if tokenizer.bos_token_id is not None else ids:
        text = tokenizer.decode(row.tolist(), skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
        templates.append(f"{text} . {{}}" if text else "{}")
    return tuple(templates)


def world_context_templates(filler: Sequence[str], n: int = 5, seed: int = 0) -> tuple[str, ...]:
    """Context prefixes drawn from a world's filler sentences: ``"{}"`` plus ``n`` of them."""
    rng = random.Random(seed)
    sentences = rng.sample(list(filler), min(n, len(filler)))
    return ("{}",) + tuple(s.replace("{", " ").replace("}", " ") + " {}" for s in sentences)


def with_context(config: MemitConfig, templates: Sequence[str]) -> MemitConfig:
    return replace(config, context_templates=tuple(templates))

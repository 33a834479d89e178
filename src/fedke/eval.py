"""Knowledge-editing metrics, defined exactly as in MEMIT / CollabEdit (NOTES.md section 4; CollabEdit
ICLR 2025, appendix C, eqs. 21-26).

Probability metrics (Multi-CounterFact; appendix C.1). ``P(o | p)`` of a possibly multi-token
object ``o`` after prompt ``p`` is ``exp(-mean NLL of o's tokens)``, as in MEMIT's
``test_batch_prediction``, so comparing probabilities means comparing mean token NLLs:

* **ES** (efficacy success, eq. 21): fraction of cases with ``P(new | edit prompt) > P(true | edit prompt)``.
* **PS** (paraphrase success, eq. 22): the same on each paraphrase prompt; mean over a case's
  paraphrases, then over cases.
* **NS** (neighbourhood success, eq. 23): fraction of neighbourhood prompts where
  ``P(true) > P(new)``, ``true`` being ``case.neighborhood_target``; per-case mean, then over cases.
* **Score** = harmonic mean of ES, PS and NS (0 if any is 0).

All comparisons are strict: a tie counts as a failure. (Eq. 21 prints ``>=`` for ES; MEMIT's code,
NOTES.md and eqs. 22-23 use a strict comparison, and so do we.)

Accuracy metrics (zsRE; appendix C.2). For an answer with tokens ``t_1..t_n`` after the prompt, the
token accuracy is the fraction of positions ``j`` at which ``t_j`` is the model's top-1 next token
given the prompt and the true ``t_1..t_{j-1}`` (teacher forcing), as MEMIT's zsRE evaluation
computes it. A token counts as top-1 only if its logit is strictly above every other logit (a tie
is not a hit; deterministic on every device).

* **EA**: token accuracy of ``target_new`` on the edit prompt.
* **PA**: of ``target_new`` on each paraphrase; per-case mean, then over cases.
* **NA**: of ``neighborhood_target`` on each neighbourhood prompt; per-case mean, then over cases.
* **AccScore** = harmonic mean of EA, PA and NA (the paper's zsRE "Score").

Aggregates are reported x100. Per-case values (the DataFrame of :func:`evaluate_cases`) stay
fractions in [0, 1]; a case without paraphrases (or neighbourhood prompts) has NaN there and is left
out of that metric's mean.

Layout: (a) pure functions over tensors / numbers (:func:`score_targets`, :func:`case_metrics`,
:func:`aggregate`, :func:`hmean`), testable on hand-made logits; (b) model-facing batched functions
(:func:`score_prompt_targets`, :func:`evaluate_cases`, :func:`prob_delta`) that tokenise, batch all
(prompt, target) sequences together sorted by length, and call the pure functions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fedke.data.records import EditCase

#: Per-case metric columns (fractions) and the aggregate keys they feed (x100).
CASE_METRICS: dict[str, str] = {"es": "ES", "ps": "PS", "ns": "NS", "ea": "EA", "pa": "PA", "na": "NA"}
SUMMARY_KEYS: tuple[str, ...] = ("ES", "PS", "NS", "Score", "EA", "PA", "NA", "AccScore", "n_cases")
#: Raw per-case columns next to the metrics: NLLs and probabilities (exp(-mean NLL)), counts.
RAW_COLUMNS: tuple[str, ...] = (
    "edit_nll_new", "edit_nll_true", "edit_p_new", "edit_p_true",
    "paraphrase_p_new", "paraphrase_p_true", "neighborhood_p_new", "neighborhood_p_true",
    "n_paraphrase", "n_neighborhood",
)
PER_CASE_COLUMNS: tuple[str, ...] = ("case_id", *CASE_METRICS, *RAW_COLUMNS)


# =============================================================================== (a) pure functions


@dataclass(frozen=True)
class TargetScores:
    """Per-sequence scores of a target continuation; every field has shape ``(B,)``, on the CPU.

    * ``mean_nll``: mean over the target's tokens of ``-log P(t_j | prefix)`` (float64).
      ``P(target) = exp(-mean_nll)``.
    * ``token_accuracy``: fraction of target tokens that are the strict top-1 next token under
      teacher forcing (float64).
    * ``first_token_top1``: whether the target's first token is the strict top-1 next token (bool).
    * ``n_tokens``: number of target tokens (int64).
    """

    mean_nll: torch.Tensor
    token_accuracy: torch.Tensor
    first_token_top1: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def prob(self) -> torch.Tensor:
        """``P(target) = exp(-mean token NLL)``."""
        return torch.exp(-self.mean_nll)

    @property
    def all_top1(self) -> torch.Tensor:
        """Whether every target token is top-1, i.e. greedy decoding would emit the target."""
        return self.token_accuracy >= 1.0

    def __len__(self) -> int:
        return int(self.mean_nll.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> TargetScores:
        """The scores of the rows in ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TargetScores(self.mean_nll[index], self.token_accuracy[index],
                            self.first_token_top1[index], self.n_tokens[index])

    @staticmethod
    def cat(parts: Sequence[TargetScores]) -> TargetScores:
        return TargetScores(*(torch.cat([getattr(p, name) for p in parts]) for name in
                              ("mean_nll", "token_accuracy", "first_token_top1", "n_tokens")))


def score_targets(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> TargetScores:
    """Mean NLL and teacher-forced top-1 accuracy of the target tokens of each sequence.

    Args:
        logits: ``(B, T, V)`` next-token logits of a causal LM: ``logits[b, i]`` predicts token
            ``i + 1``.
        input_ids: ``(B, T)`` the sequences (prompt tokens, then target tokens, then padding).
        target_mask: ``(B, T)`` bool, True at the positions of target tokens. Position 0 cannot be
            a target (nothing predicts it). Every row needs at least one target token.

    Only the ``N`` predicting rows of ``logits`` are normalised (in float32), never the full
    ``(B, T, V)`` tensor. Returns CPU tensors.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2] or target_mask.shape != input_ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"target_mask {tuple(target_mask.shape)}")
    target_mask = target_mask.to(device=logits.device, dtype=torch.bool)
    input_ids = input_ids.to(logits.device)
    if target_mask[:, 0].any():
        raise ValueError("a target token at position 0 has no preceding position to predict it")
    predicted = target_mask[:, 1:]                                   # (B, T-1): logits[:, i] -> token i+1
    n_tokens = predicted.sum(dim=1)
    if (n_tokens == 0).any():
        raise ValueError(f"rows {torch.nonzero(n_tokens == 0).flatten().tolist()} have no target token")
    rows = logits[:, :-1][predicted].float()                         # (N, V)
    tokens = input_ids[:, 1:][predicted].unsqueeze(1)                # (N, 1)
    sequence = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(predicted)[predicted]

    token_nll = -rows.log_softmax(dim=-1).gather(1, tokens).squeeze(1)
    target_logit = rows.gather(1, tokens).squeeze(1)
    best_other = rows.scatter(1, tokens, float("-inf")).amax(dim=1)
    top1 = target_logit > best_other

    batch = logits.shape[0]
    nll_sum = torch.zeros(batch, dtype=torch.float64, device=logits.device).index_add_(0, sequence, token_nll.double())
    hits = torch.zeros(batch, dtype=torch.float64, device=logits.device).index_add_(0, sequence, top1.double())
    is_first = ((predicted.cumsum(dim=1) == 1) & predicted)[predicted]
    first_top1 = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    first_top1[sequence[is_first]] = top1[is_first]
    n = n_tokens.to(torch.float64)
    return TargetScores(
        mean_nll=(nll_sum / n).cpu(),
        token_accuracy=(hits / n).cpu(),
        first_token_top1=first_top1.cpu(),
        n_tokens=n_tokens.to(torch.int64).cpu(),
    )


def prefers(nll_preferred: float, nll_other: float) -> bool:
    """``P(preferred) > P(other)`` for ``P = exp(-mean NLL)``, i.e. a strictly lower mean NLL."""
    return bool(nll_preferred < nll_other)


@dataclass(frozen=True)
class PromptPair:
    """One prompt scored with the two competing answers.

    ``new`` is the case's ``target_new``. ``true`` is ``target_true`` on edit and paraphrase
    prompts, and ``neighborhood_target`` on neighbourhood prompts. Each ``nll_*`` is a mean token
    NLL; each ``acc_*`` a teacher-forced token accuracy.
    """

    nll_new: float
    nll_true: float
    acc_new: float
    acc_true: float

    @property
    def p_new(self) -> float:
        return math.exp(-self.nll_new)

    @property
    def p_true(self) -> float:
        return math.exp(-self.nll_true)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def case_metrics(edit: PromptPair, paraphrases: Sequence[PromptPair],
                 neighborhood: Sequence[PromptPair]) -> dict[str, float]:
    """One case's metrics (fractions in [0, 1]) and raw probabilities, from its scored prompts.

    ``es = [P(new|edit) > P(true|edit)]``; ``ps`` = mean over paraphrases of the same;
    ``ns`` = mean over neighbourhood prompts of ``[P(true) > P(new)]``; ``ea`` = token accuracy of
    new on the edit prompt; ``pa`` = its mean over paraphrases; ``na`` = mean over neighbourhood
    prompts of the token accuracy of the neighbourhood target. An empty prompt list gives NaN.
    """
    return {
        "es": float(prefers(edit.nll_new, edit.nll_true)),
        "ps": _mean(float(prefers(p.nll_new, p.nll_true)) for p in paraphrases),
        "ns": _mean(float(prefers(p.nll_true, p.nll_new)) for p in neighborhood),
        "ea": float(edit.acc_new),
        "pa": _mean(p.acc_new for p in paraphrases),
        "na": _mean(p.acc_true for p in neighborhood),
        "edit_nll_new": float(edit.nll_new),
        "edit_nll_true": float(edit.nll_true),
        "edit_p_new": edit.p_new,
        "edit_p_true": edit.p_true,
        "paraphrase_p_new": _mean(p.p_new for p in paraphrases),
        "paraphrase_p_true": _mean(p.p_true for p in paraphrases),
        "neighborhood_p_new": _mean(p.p_new for p in neighborhood),
        "neighborhood_p_true": _mean(p.p_true for p in neighborhood),
        "n_paraphrase": len(paraphrases),
        "n_neighborhood": len(neighborhood),
    }


def hmean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / sum(1 / v)``; 0 if any value is 0, NaN if any is NaN or none is given.

    Raises ValueError on a negative value.
    """
    values = [float(v) for v in values]
    if not values or any(math.isnan(v) for v in values):
        return float("nan")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean of negative values is undefined: {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate(per_case: pd.DataFrame) -> dict[str, float]:
    """Aggregate per-case metrics (any subset of :func:`evaluate_cases`' rows) into the paper's table.

    Returns ``{"ES","PS","NS","Score","EA","PA","NA","AccScore","n_cases"}``: each metric is
    ``100 *`` the mean over cases of the per-case value, skipping NaN (cases without paraphrases or
    neighbourhood prompts); ``Score = hmean(ES, PS, NS)``, ``AccScore = hmean(EA, PA, NA)``.
    """
    summary: dict[str, float] = {}
    for column, key in CASE_METRICS.items():
        values = per_case[column].to_numpy(dtype=float) if column in per_case else np.array([])
        values = values[~np.isnan(values)]
        summary[key] = 100.0 * float(values.mean()) if values.size else float("nan")
    summary["Score"] = hmean(summary[k] for k in ("ES", "PS", "NS"))
    summary["AccScore"] = hmean(summary[k] for k in ("EA", "PA", "NA"))
    summary["n_cases"] = int(len(per_case))
    return {key: summary[key] for key in SUMMARY_KEYS}


# ========================================================================== (b) model-facing, batched


@dataclass(frozen=True)
class CaseMetrics:
    """What :func:`evaluate_cases` returns.

    * ``per_case``: one row per case, columns :data:`PER_CASE_COLUMNS` (metrics as fractions).
    * ``summary``: ``aggregate(per_case)``, the x100 table row.
    """

    per_case: pd.DataFrame
    summary: dict[str, float]

    def __getitem__(self, key: str) -> float:
        return self.summary[key]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device inputs should go to: ``model.device`` if the model has one, else its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's default special tokens (Llama adds BOS; GPT-2 adds none)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_target(tokenizer: Any, target: str) -> list[int]:
    """Target ids: ``tokenizer(" " + target, add_special_tokens=False)``, leading spaces of ``target`` dropped.

    SentencePiece tokenizers (Llama 1/2) turn the leading space into a lone ``"▁"`` token before
    the word; a first token that decodes to whitespace only is therefore dropped (GPT-2-style BPE
    never produces one, its space is part of the word token).
    """
    ids = list(tokenizer(" " + target.lstrip(), add_special_tokens=False)["input_ids"])
    if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def _pad_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0  # masked out by the attention mask and never scored


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _collate(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` for (prompt, target) id pairs."""
    width = max(len(p) + len(t) for p, t in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, target) in enumerate(sequences):
        length = len(prompt) + len(target)
        input_ids[row, :length] = torch.tensor(prompt + target, dtype=torch.long)
        attention[row, :length] = 1
        target_mask[row, len(prompt):length] = True
    return input_ids.to(device), attention.to(device), target_mask.to(device)


def score_prompt_targets(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                         targets: Sequence[str], *, batch_size: int = 64,
                         device: torch.device | str | None = None, progress: bool = False) -> TargetScores:
    """Score each ``targets[i]`` as the continuation of ``prompts[i]``: the batched primitive.

    Identical (prompt, target) pairs are run once. All sequences are sorted by length (longest
    first, so an out-of-memory error shows in the first batch), right-padded with an attention mask,
    and run ``batch_size`` at a time under ``torch.inference_mode`` on ``device`` (default: the
    model's device). The model is put in eval mode for the call and restored afterwards.
    Returns :class:`TargetScores` aligned with the inputs, on the CPU.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    empty = torch.zeros(0)
    if not prompts:
        return TargetScores(empty.double(), empty.double(), empty.bool(), empty.long())
    device = torch.device(device) if device is not None else model_device(model)

    unique: dict[tuple[str, str], int] = {}
    position = [unique.setdefault((p, t), len(unique)) for p, t in zip(prompts, targets)]
    prompt_ids: dict[str, list[int]] = {}
    target_ids: dict[str, list[int]] = {}
    sequences = []
    for prompt, target in unique:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = encode_prompt(tokenizer, prompt)
            if not prompt_ids[prompt]:
                raise ValueError(f"prompt {prompt!r} tokenises to nothing (and the tokenizer adds no BOS)")
        if target not in target_ids:
            target_ids[target] = encode_target(tokenizer, target)
        sequences.append((prompt_ids[prompt], target_ids[target]))

    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="evaluating", unit="batch")
    pad_id = _pad_id(tokenizer)
    parts: list[TargetScores] = []
    with _eval_mode(model), torch.inference_mode():
        for batch in batches:
            input_ids, attention, target_mask = _collate([sequences[i] for i in batch], pad_id, device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            parts.append(score_targets(logits, input_ids, target_mask))
    scores = TargetScores.cat(parts)
    # rows are in `order`; put them back in the order of `unique`, then of the inputs
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return scores.select(inverse[torch.tensor(position, dtype=torch.long)])


def _check_case(case: EditCase) -> None:
    request = case.request
    if not request.target_true or not request.target_true.strip():
        raise ValueError(f"case {case.case_id!r}: no target_true, so ES/PS/NS are undefined")
    if case.neighborhood_prompts and not (case.neighborhood_target and case.neighborhood_target.strip()):
        raise ValueError(f"case {case.case_id!r}: neighbourhood prompts without a neighborhood_target")


def evaluate_cases(model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase], *,
                   batch_size: int = 64, device: torch.device | str | None = None,
                   progress: bool = False) -> CaseMetrics:
    """ES, PS, NS, Score, EA, PA, NA and AccScore of ``model`` on ``cases`` (definitions: module docstring).

    Works for any Hugging Face causal LM and its tokenizer (or anything with the same call
    signatures: ``model(input_ids=, attention_mask=).logits`` and ``tokenizer(text)["input_ids"]``).
    Every (prompt, answer) sequence of every case goes through :func:`score_prompt_targets` in one
    batched pass: the edit prompt, each paraphrase and each neighbourhood prompt with both answers.

    Returns:
        :class:`CaseMetrics` with the per-case DataFrame (fractions) and ``aggregate()`` of it (x100).

    Raises:
        ValueError: a case without ``target_true``, or with neighbourhood prompts but no
            ``neighborhood_target``.
    """
    for case in cases:
        _check_case(case)
    prompts: list[str] = []
    targets: list[str] = []
    # per case: (first row, n paraphrases, n neighbourhood prompts); each prompt takes two rows
    layout: list[tuple[int, int, int]] = []
    for case in cases:
        request = case.request
        layout.append((len(prompts), len(case.paraphrase_prompts), len(case.neighborhood_prompts)))
        for prompt in (request.text, *case.paraphrase_prompts):
            prompts += [prompt, prompt]
            targets += [request.target_new, request.target_true]
        for prompt in case.neighborhood_prompts:
            prompts += [prompt, prompt]
            targets += [request.target_new, case.neighborhood_target]
    scores = score_prompt_targets(model, tokenizer, prompts, targets, batch_size=batch_size,
                                  device=device, progress=progress)
    nll = scores.mean_nll.tolist()
    acc = scores.token_accuracy.tolist()

    def pair(row: int) -> PromptPair:
        return PromptPair(nll[row], nll[row + 1], acc[row], acc[row + 1])

    rows = []
    for case, (start, n_para, n_neigh) in zip(cases, layout):
        pairs = [pair(start + 2 * k) for k in range(1 + n_para + n_neigh)]
        rows.append({"case_id": case.case_id, **case_metrics(pairs[0], pairs[1:1 + n_para], pairs[1 + n_para:])})
    per_case = pd.DataFrame(rows, columns=list(PER_CASE_COLUMNS))
    return CaseMetrics(per_case=per_case, summary=aggregate(per_case))


def prob_delta(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets_a: Sequence[str],
               targets_b: Sequence[str], *, batch_size: int = 64, device: torch.device | str | None = None,
               progress: bool = False) -> pd.DataFrame:
    """``P(a) - P(b)`` per prompt, for knowledge-conflict studies (CollabEdit Table 4).

    ``P = exp(-mean token NLL)`` as for ES. Columns: ``prompt, target_a, target_b, p_a, p_b,
    delta_p`` (= ``p_a - p_b``, a fraction), ``a_top1`` (a's first token is the strict top-1 next
    token) and ``a_all_top1`` (every token of a is top-1 under teacher forcing: greedy decoding
    emits a). See :func:`conflict_summary` for the paper's Avg-DeltaP and Succ.
    """
    if not len(prompts) == len(targets_a) == len(targets_b):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(targets_a)} targets_a, "
                         f"{len(targets_b)} targets_b")
    n = len(prompts)
    scores = score_prompt_targets(model, tokenizer, [*prompts, *prompts], [*targets_a, *targets_b],
                                  batch_size=batch_size, device=device, progress=progress)
    a, b = scores.select(range(n)), scores.select(range(n, 2 * n))
    p_a, p_b = a.prob.numpy(), b.prob.numpy()
    return pd.DataFrame({
        "prompt": list(prompts), "target_a": list(targets_a), "target_b": list(targets_b),
        "p_a": p_a, "p_b": p_b, "delta_p": p_a - p_b,
        "a_top1": a.first_token_top1.numpy(), "a_all_top1": a.all_top1.numpy(),
    })


def conflict_summary(deltas: pd.DataFrame) -> dict[str, float]:
    """CollabEdit Table 4 from :func:`prob_delta`: ``Avg-DeltaP`` = 100 * mean(P(a) - P(b)) and
    ``Succ`` = 100 * fraction of prompts whose top-1 next token is a's first token."""
    if len(deltas) == 0:
        return {"Avg-DeltaP": float("nan"), "Succ": float("nan"), "n": 0}
    return {"Avg-DeltaP": 100.0 * float(deltas["delta_p"].mean()),
            "Succ": 100.0 * float(deltas["a_top1"].mean()), "n": int(len(deltas))}


def summary_table(groups: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row of :func:`aggregate` per named subset of per-case rows (e.g. per round or per client)."""
    return pd.DataFrame([{"group": name, **aggregate(frame)} for name, frame in groups.items()])

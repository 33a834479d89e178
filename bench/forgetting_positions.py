"""Where the old edits are forgotten: the later rounds' update, split by token position.

    python bench/forgetting_positions.py --rounds 30 --clients 10 --edits-per-client 2 \
        --model-width 256 --model-epochs 80 --lam 100 --target-steps 60 --target-clamp 4 \
        --target-loss-stop 5e-4 --out positions.json [--covariance immutable] [--quick]

Dynamic C (eq. 7) adds each merged round's ``K K^T`` to the regulariser. Those keys are taken at
ONE position of each edit prompt, the subject's last token, so ``A_t`` anchors what the old edits
wrote there and nothing else. This script asks where the forgetting happens. It runs the
forgetting scenario of ``bench/forgetting.py`` (the same flags) for ``--rounds`` rounds, keeps the
global update after round 1 (``U_1``, the old edits alone) and after the last round (``U_R``), and
scores the old edits E_o on the model ``W + U_1`` with the later rounds' update
``D = U_R - U_1`` added to each edited layer's output only at some token positions::

    out_l(x_p) = (W_l + U_1,l) x_p + m_p D_l x_p,      m_p in {0, 1} per position p

* ``none``: ``m = 0`` everywhere (E_o as after round 1, the benchmark's "before");
* ``all``: ``m = 1`` everywhere (the model after round R: the benchmark's "after");
* ``subject``: ``m = 1`` on the prompt's subject tokens only (where MEMIT reads its keys);
* ``other``: ``m = 1`` on every other position (the template's words and the answer's tokens).

A neighbourhood prompt is about another subject (same relation, same true object); its subject
tokens are that subject's. Its NA is also split by whether that subject was edited (in another
relation) in rounds 2..R (``NA_edited_subject``) or not (``NA_unedited_subject``).

Writes ``{"config", "rounds", "update_norms", "positions"}``: ``positions`` maps each of the four
masks to Table 5's metrics of E_o (x100) plus the NA split and its counts; ``update_norms`` holds
``||U_1||`` and ``||U_R - U_1||`` per edited layer (Frobenius).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402
from forgetting import TABLE5, build_parser, parse_args, scenario_from_args  # noqa: E402

from fedke.editing import applied_update  # noqa: E402
from fedke.editing.presets import get_module  # noqa: E402
from fedke.eval import PromptPair, aggregate, case_metrics, encode_prompt, encode_target  # noqa: E402
from fedke.simulations.multiround import run_multiround  # noqa: E402
from fedke.simulations.oracle import round_cases  # noqa: E402
from fedke.simulations.runtime import testbed_for  # noqa: E402

MASKS = ("none", "all", "subject", "other")


def global_updates(scenario, rounds: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(U_1, U_R)``: the global update after round 1 and after round ``rounds`` of one run (the
    run is checkpointed after round 1 and resumed, so both come from the same run)."""
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="fedke-positions-"))
    try:
        run = replace(scenario, checkpoint_dir=str(checkpoint_dir / "run"), output_dir=str(checkpoint_dir / "results"))
        first = run_multiround(run, write=False, stop_after=1).strategy.global_update
        first = {name: np.array(delta, copy=True) for name, delta in first.items()}
        last = run_multiround(replace(run, resume=True), write=False, stop_after=rounds).strategy.global_update
        return first, {name: np.array(delta, copy=True) for name, delta in last.items()}
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


class PositionMaskedUpdate:
    """Forward hooks adding ``m_p D_l x_p`` to each edited layer's output; :attr:`mask` and the
    subject's token span are set before each forward pass of ONE sequence."""

    def __init__(self, model: torch.nn.Module, update: dict[str, np.ndarray]) -> None:
        self.mask, self.span = "none", (0, 0)
        self.handles = [get_module(model, name).register_forward_hook(self._hook(torch.as_tensor(delta, dtype=torch.float32)))
                        for name, delta in update.items()]

    def _hook(self, delta: torch.Tensor):
        def hook(module, inputs, output):
            if self.mask == "none":
                return None
            weights = torch.ones(output.shape[1], dtype=output.dtype)
            start, stop = self.span
            if self.mask == "subject":
                weights.zero_()
                weights[start:stop] = 1
            elif self.mask == "other":
                weights[start:stop] = 0
            return output + (inputs[0] @ delta.T.to(output.dtype)) * weights[None, :, None]
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def subject_span(tokenizer, text: str, subject: str) -> tuple[int, int]:
    """Token positions ``[start, stop)`` of ``subject`` in ``text`` (MEMIT's tokenisation: the
    prefix through the subject, right-stripped, tokenised alone)."""
    at = text.index(subject)
    start = len(tokenizer(text[:at].rstrip())["input_ids"]) if at > 0 else 0
    return start, len(tokenizer(text[:at + len(subject)].rstrip())["input_ids"])


@torch.no_grad()
def score(model, tokenizer, hooks: PositionMaskedUpdate, prompt: str, subject: str, target: str) -> tuple[float, float]:
    """Mean token NLL and teacher-forced token accuracy of ``target`` after ``prompt`` (as
    :func:`fedke.eval.score_prompt_targets`), one sequence at a time so that the mask is exact."""
    prompt_ids, target_ids = encode_prompt(tokenizer, prompt), encode_target(tokenizer, target)
    hooks.span = subject_span(tokenizer, prompt, subject)
    logits = model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0, len(prompt_ids) - 1:-1].double()
    targets = torch.tensor(target_ids)
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(target_ids)), targets].mean()
    return float(nll), float((logits.argmax(-1) == targets).double().mean())


def score_old_edits(model, tokenizer, hooks, cases, subjects: list[str], edited_later: set[str]) -> dict:
    """Table 5 of E_o under the current mask, plus NA split by whether the neighbour's subject was edited later."""
    by_length = sorted(subjects, key=len, reverse=True)
    rows, na_edited, na_unedited = [], [], []
    for case in cases:
        request = case.request

        def pair(prompt, subject, true_answer):
            nll_new, acc_new = score(model, tokenizer, hooks, prompt, subject, request.target_new)
            nll_true, acc_true = score(model, tokenizer, hooks, prompt, subject, true_answer)
            return PromptPair(nll_new, nll_true, acc_new, acc_true)

        edit = pair(request.text, request.subject, request.target_true)
        paraphrases = [pair(p, request.subject, request.target_true) for p in case.paraphrase_prompts]
        neighbours = []
        for prompt in case.neighborhood_prompts:
            subject = next(s for s in by_length if s in prompt)
            neighbours.append(pair(prompt, subject, case.neighborhood_target))
            (na_edited if subject in edited_later else na_unedited).append(neighbours[-1].acc_true)
        rows.append(case_metrics(edit, paraphrases, neighbours))
    summary = {key: float(aggregate(pd.DataFrame(rows))[key]) for key in TABLE5}
    summary["NA_edited_subject"] = 100 * float(np.mean(na_edited)) if na_edited else float("nan")
    summary["NA_unedited_subject"] = 100 * float(np.mean(na_unedited)) if na_unedited else float("nan")
    summary["n_neighbours_edited_subject"], summary["n_neighbours_unedited_subject"] = len(na_edited), len(na_unedited)
    return summary


def main(argv=None) -> dict:
    parser = build_parser()
    parser.description = __doc__
    parser.set_defaults(rounds=30)
    parser.add_argument("--covariance", choices=["dynamic", "immutable"], default="dynamic")
    args = parse_args(argv, parser)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 edits the old set)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    scenario = replace(scenario_from_args(args), covariance=args.covariance)
    started = time.perf_counter()
    first, last = global_updates(scenario, args.rounds)
    print(f"{args.rounds} rounds ({args.covariance} C) in {time.perf_counter() - started:.0f} s", flush=True)

    bed = testbed_for(scenario)
    model, tokenizer = bed.model, bed.tokenizer
    old = round_cases(scenario, 1)
    edited_later = {case.request.subject for r in range(2, args.rounds + 1) for case in round_cases(scenario, r)}
    later = {name: last[name] - first[name] for name in last}
    hooks = PositionMaskedUpdate(model, later)
    positions = {}
    was_training = model.training
    model.eval()
    try:
        with applied_update(model, first):
            for mask in MASKS:
                hooks.mask = mask
                positions[mask] = score_old_edits(model, tokenizer, hooks, old, list(bed.world.subjects), edited_later)
    finally:
        hooks.remove()
        model.train(was_training)

    columns = [*TABLE5, "NA_edited_subject", "NA_unedited_subject"]
    print(f"\nOld edits E_o on W + U_1 with U_R - U_1 at some positions (x100), after {args.rounds} rounds, "
          f"{args.covariance} C")
    print(pd.DataFrame(positions).T[columns].round(1).to_string())
    norms = {name: {"U_1": float(np.linalg.norm(first[name])), "U_R - U_1": float(np.linalg.norm(later[name]))}
             for name in later}
    result = {"config": {key: value for key, value in vars(args).items() if key not in ("out", "quick")},
              "rounds": args.rounds, "update_norms": norms, "positions": positions}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

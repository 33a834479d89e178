"""Metrics of fedke.eval on hand-made logits, a lookup-table causal LM and a tiny random GPT-2."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedke.data.records import EditCase, EditRequest
from fedke.eval import (
    PER_CASE_COLUMNS,
    SUMMARY_KEYS,
    PromptPair,
    aggregate,
    case_metrics,
    conflict_summary,
    encode_target,
    evaluate_cases,
    hmean,
    prob_delta,
    score_prompt_targets,
    score_targets,
)

WORDS = ["Ada", "Bob", "Cy", "lives", "works", "resides", "calls", "home", "in", "is", "employed",
         "Paris", "Rome", "New", "York", "Tokyo"]


# ------------------------------------------------------------------------------ tiny tokenizer


def make_tokenizer(*, bos: bool = False, eos: bool = True):
    """WordLevel + whitespace tokenizer; optionally a Llama-like BOS added to every encoded text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    kwargs = {"unk_token": "[UNK]"}
    if bos:
        kwargs["bos_token"] = "[BOS]"
    if eos:
        kwargs["eos_token"] = "[EOS]"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


# ----------------------------------------------------------------------- lookup-table causal LM


class LookupLM(torch.nn.Module):
    """A causal LM whose next-token logits after a prefix come from a table (default: all zeros).

    ``table`` maps a tuple of token ids (the prefix up to and including position i) to a
    ``{token id: logit}`` dict; missing tokens get logit 0. Padding after a sequence never
    changes the logits before it, as in a real causal LM.
    """

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab_size: int):
        super().__init__()
        self.table = table
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(tuple(input_ids.shape))
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab_size)
        for b in range(batch):
            ids = input_ids[b].tolist()
            for i in range(width):
                for token, value in self.table.get(tuple(ids[: i + 1]), {}).items():
                    logits[b, i, token] = value
        return SimpleNamespace(logits=logits)


class World:
    """Builds the LookupLM table from readable text: ``world.set("Ada lives in", Rome=3, Paris=1)``."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.table: dict[tuple[int, ...], dict[int, float]] = {}

    def set(self, prefix: str, **logits: float) -> None:
        key = tuple(self.tok(prefix)["input_ids"])
        self.table[key] = {self.tok.convert_tokens_to_ids(w): v for w, v in logits.items()}

    def model(self) -> LookupLM:
        return LookupLM(self.table, len(self.tok))

    def nll(self, prefix: str, word: str) -> float:
        """-log softmax of ``word`` after ``prefix``, computed here by hand from the table."""
        values = dict.fromkeys(range(len(self.tok)), 0.0)
        values.update(self.table.get(tuple(self.tok(prefix)["input_ids"]), {}))
        logz = math.log(sum(math.exp(v) for v in values.values()))
        return logz - values[self.tok.convert_tokens_to_ids(word)]


def case(case_id, prompt, subject, new, true, paraphrases=(), neighborhood=(), neighborhood_target=None):
    request = EditRequest(prompt, subject, new, "P1", true, case_id)
    return EditCase(case_id, request, tuple(paraphrases), tuple(neighborhood),
                    neighborhood_target if neighborhood_target is not None else true)


def build_scenario(tokenizer):
    """Two cases whose metrics are known by hand (see the expectations in the tests)."""
    world = World(tokenizer)
    # case "a": single-token targets. New wins on the edit prompt and on one paraphrase, loses on
    # the other; the neighbour keeps its true answer.
    world.set("Ada lives in", Rome=3, Paris=1)
    world.set("Ada resides in", Rome=1, Paris=3)          # paraphrase: new loses
    world.set("Ada calls home", Rome=3)                   # paraphrase: new wins
    world.set("Bob lives in", Paris=2, Rome=1)            # neighbour: true wins, top-1
    # case "b": multi-token new target "New York" vs "Tokyo".
    world.set("Bob works in", New=2, Tokyo=2)             # first token ties with Tokyo
    world.set("Bob works in New", York=5)                 # second token clearly top-1
    # paraphrase "Bob is employed in": no entry, uniform logits everywhere -> exact tie
    world.set("Ada works in", New=3, Tokyo=1)             # neighbour: new wins (NS fails)
    world.set("Cy works in", Tokyo=4)                     # neighbour: true wins
    cases = [
        case("a", "{} lives in", "Ada", "Rome", "Paris",
             paraphrases=["Ada resides in", "Ada calls home"], neighborhood=["Bob lives in"]),
        case("b", "{} works in", "Bob", "New York", "Tokyo",
             paraphrases=["Bob is employed in"], neighborhood=["Ada works in", "Cy works in"]),
    ]
    return world, cases


# ------------------------------------------------------------------------------ pure functions


def test_score_targets_on_hand_made_logits():
    # V = 3. Row 0: prompt [0], target [1, 2]. Row 1: prompt [2, 0], target [1], one pad.
    input_ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    target_mask = torch.tensor([[False, True, True], [False, False, True]])
    logits = torch.tensor([
        [[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [9.0, 9.0, 9.0]],   # predicts 1 (top-1), then 2 (tie)
        [[5.0, 5.0, 5.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]],   # predicts 1 (not top-1)
    ])
    scores = score_targets(logits, input_ids, target_mask)
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    nll_0 = ((lse([0, 2, 0]) - 2.0) + (lse([1, 1, 1]) - 1.0)) / 2
    nll_1 = lse([3, 0, 0]) - 0.0
    assert scores.mean_nll.tolist() == pytest.approx([nll_0, nll_1], abs=1e-6)
    assert scores.token_accuracy.tolist() == [0.5, 0.0]       # a tie is not a top-1 hit
    assert scores.first_token_top1.tolist() == [True, False]
    assert scores.n_tokens.tolist() == [2, 1]
    assert scores.all_top1.tolist() == [False, False]
    assert scores.prob.tolist() == pytest.approx([math.exp(-nll_0), math.exp(-nll_1)])


def test_score_targets_rejects_bad_masks():
    logits = torch.zeros(1, 3, 4)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="position 0"):
        score_targets(logits, ids, torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="no target token"):
        score_targets(logits, ids, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        score_targets(logits, ids[:, :2], torch.zeros(1, 2, dtype=torch.bool))


def test_score_targets_bfloat16_logits():
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    low = score_targets(logits, ids, mask)
    high = score_targets(logits.float(), ids, mask)
    assert torch.allclose(low.mean_nll, high.mean_nll)


def test_case_metrics_and_ties():
    edit = PromptPair(nll_new=1.0, nll_true=2.0, acc_new=1.0, acc_true=0.0)
    tie = PromptPair(nll_new=1.5, nll_true=1.5, acc_new=0.0, acc_true=0.0)
    lose = PromptPair(nll_new=3.0, nll_true=1.0, acc_new=0.5, acc_true=1.0)
    row = case_metrics(edit, [edit, tie, lose], [lose, tie])
    assert row["es"] == 1.0
    assert row["ps"] == pytest.approx(1 / 3)      # tie counts as failure
    assert row["ns"] == pytest.approx(0.5)        # lose: true preferred; tie: failure
    assert row["ea"] == 1.0
    assert row["pa"] == pytest.approx(0.5)
    assert row["na"] == pytest.approx(0.5)
    assert row["edit_p_new"] == pytest.approx(math.exp(-1.0))
    assert row["n_paraphrase"] == 3 and row["n_neighborhood"] == 2
    empty = case_metrics(tie, [], [])
    assert empty["es"] == 0.0 and math.isnan(empty["ps"]) and math.isnan(empty["na"])


def test_hmean():
    assert hmean([100, 25, 75]) == pytest.approx(3 / (1 / 100 + 1 / 25 + 1 / 75))
    assert hmean([50, 50]) == pytest.approx(50)
    assert hmean([100, 0, 80]) == 0.0
    assert math.isnan(hmean([]))
    assert math.isnan(hmean([1.0, float("nan")]))
    with pytest.raises(ValueError):
        hmean([1.0, -1.0])


def test_aggregate_skips_nan_and_counts():
    frame = pd.DataFrame({"case_id": [1, 2], "es": [1.0, 0.0], "ps": [0.5, np.nan], "ns": [1.0, 1.0],
                          "ea": [1.0, 0.5], "pa": [0.0, 0.0], "na": [1.0, 1.0]})
    summary = aggregate(frame)
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["ES"] == 50.0 and summary["PS"] == 50.0 and summary["NS"] == 100.0
    assert summary["Score"] == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 100))
    assert summary["EA"] == 75.0 and summary["PA"] == 0.0 and summary["AccScore"] == 0.0
    assert summary["n_cases"] == 2
    nothing = aggregate(frame.iloc[:0])
    assert nothing["n_cases"] == 0 and math.isnan(nothing["ES"]) and math.isnan(nothing["Score"])


# --------------------------------------------------------------------------- evaluate_cases


@pytest.mark.parametrize("bos", [False, True], ids=["gpt2-like", "llama-like-bos"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_evaluate_cases_known_metrics(bos, batch_size):
    tokenizer = make_tokenizer(bos=bos)
    world, cases = build_scenario(tokenizer)
    result = evaluate_cases(world.model(), tokenizer, cases, batch_size=batch_size)
    frame = result.per_case.set_index("case_id")
    assert list(result.per_case.columns) == list(PER_CASE_COLUMNS)

    # case a: ES 1; paraphrases: lose + win -> PS 0.5, PA 0.5; neighbour kept -> NS 1, NA 1
    assert frame.loc["a", ["es", "ps", "ns", "ea", "pa", "na"]].tolist() == [1.0, 0.5, 1.0, 1.0, 0.5, 1.0]
    # case b: mean NLL("New York") = (nll(New) + nll(York)) / 2 < nll(Tokyo) = nll(New): ES 1,
    # but "New" ties with "Tokyo" so only "York" is top-1: EA 0.5. Paraphrase: uniform logits,
    # an exact tie -> PS 0, PA 0. Neighbours: one lost, one kept -> NS 0.5, NA 0.5.
    assert frame.loc["b", ["es", "ps", "ns", "ea", "pa", "na"]].tolist() == [1.0, 0.0, 0.5, 0.5, 0.0, 0.5]

    nll_new = (world.nll("Bob works in", "New") + world.nll("Bob works in New", "York")) / 2
    nll_true = world.nll("Bob works in", "Tokyo")
    assert frame.loc["b", "edit_nll_new"] == pytest.approx(nll_new, abs=1e-6)
    assert frame.loc["b", "edit_nll_true"] == pytest.approx(nll_true, abs=1e-6)
    assert frame.loc["b", "edit_p_new"] == pytest.approx(math.exp(-nll_new), abs=1e-6)
    assert frame.loc["a", "edit_p_true"] == pytest.approx(math.exp(-world.nll("Ada lives in", "Paris")), abs=1e-6)
    assert frame.loc["b", "n_neighborhood"] == 2

    summary = result.summary
    assert summary["ES"] == 100.0
    assert summary["PS"] == 25.0
    assert summary["NS"] == 75.0
    assert summary["Score"] == pytest.approx(3 / (1 / 100 + 1 / 25 + 1 / 75))
    assert summary["EA"] == 75.0 and summary["PA"] == 25.0 and summary["NA"] == 75.0
    assert summary["AccScore"] == pytest.approx(45.0)
    assert summary["n_cases"] == 2
    assert result["Score"] == summary["Score"]

    # aggregating a subset: case b alone has PS = 0, so both harmonic means are 0
    only_b = aggregate(result.per_case[result.per_case.case_id == "b"])
    assert only_b["PS"] == 0.0 and only_b["Score"] == 0.0 and only_b["AccScore"] == 0.0
    assert only_b["n_cases"] == 1


def test_evaluate_cases_batches_sorted_and_deduplicated():
    tokenizer = make_tokenizer()
    world, cases = build_scenario(tokenizer)
    model = world.model()
    evaluate_cases(model, tokenizer, cases + [case("c", "{} lives in", "Ada", "Rome", "Paris")], batch_size=64)
    # case c repeats case a's edit prompt and answers: 2 + 1*2*... sequences, one forward pass
    assert len(model.calls) == 1
    n_unique = 2 * (1 + 2 + 1) + 2 * (1 + 1 + 2)
    assert model.calls[0][0] == n_unique
    model.calls.clear()
    evaluate_cases(model, tokenizer, cases, batch_size=5)
    widths = [width for _, width in model.calls]
    assert widths == sorted(widths, reverse=True)     # longest first


def test_evaluate_cases_without_pad_or_eos_token():
    tokenizer = make_tokenizer(eos=False)
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is None
    world, cases = build_scenario(tokenizer)
    result = evaluate_cases(world.model(), tokenizer, cases, batch_size=64)
    assert result.summary["ES"] == 100.0 and result.summary["PS"] == 25.0


def test_evaluate_cases_validates_and_handles_empty():
    tokenizer = make_tokenizer()
    world, _ = build_scenario(tokenizer)
    missing_true = EditCase("x", EditRequest("{} lives in", "Ada", "Rome", case_id="x"))
    with pytest.raises(ValueError, match="'x'.*target_true"):
        evaluate_cases(world.model(), tokenizer, [missing_true])
    empty = evaluate_cases(world.model(), tokenizer, [])
    assert len(empty.per_case) == 0 and empty.summary["n_cases"] == 0


def test_target_leading_space_is_stripped():
    tokenizer = make_tokenizer()
    assert encode_target(tokenizer, " New York") == encode_target(tokenizer, "New York")
    assert tokenizer.convert_ids_to_tokens(encode_target(tokenizer, "New York")) == ["New", "York"]


def test_prob_delta_and_conflict_summary():
    tokenizer = make_tokenizer()
    world, _ = build_scenario(tokenizer)
    deltas = prob_delta(world.model(), tokenizer, ["Ada lives in", "Ada resides in", "Bob works in"],
                        ["Rome", "Rome", "New York"], ["Paris", "Paris", "Tokyo"])
    expected_first = math.exp(-world.nll("Ada lives in", "Rome")) - math.exp(-world.nll("Ada lives in", "Paris"))
    assert deltas.loc[0, "delta_p"] == pytest.approx(expected_first, abs=1e-6)
    assert deltas["delta_p"].iloc[1] < 0
    assert deltas["a_top1"].tolist() == [True, False, False]          # "New" ties with "Tokyo"
    assert deltas["a_all_top1"].tolist() == [True, False, False]
    summary = conflict_summary(deltas)
    assert summary["Succ"] == pytest.approx(100 / 3)
    assert summary["Avg-DeltaP"] == pytest.approx(100 * deltas["delta_p"].mean())
    with pytest.raises(ValueError):
        prob_delta(world.model(), tokenizer, ["Ada lives in"], ["Rome"], [])


def test_score_prompt_targets_order_matches_inputs():
    tokenizer = make_tokenizer()
    world, _ = build_scenario(tokenizer)
    prompts = ["Bob works in", "Ada lives in", "Bob works in", "Ada lives in"]
    targets = ["New York", "Rome", "Tokyo", "Rome"]
    scores = score_prompt_targets(world.model(), tokenizer, prompts, targets, batch_size=1)
    expected = [(world.nll("Bob works in", "New") + world.nll("Bob works in New", "York")) / 2,
                world.nll("Ada lives in", "Rome"), world.nll("Bob works in", "Tokyo"),
                world.nll("Ada lives in", "Rome")]
    assert scores.mean_nll.tolist() == pytest.approx(expected, abs=1e-6)
    assert scores.n_tokens.tolist() == [2, 1, 1, 1]


# ----------------------------------------------------------------------- real HF architecture


def test_gpt2_batching_invariance():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                       n_positions=32, bos_token_id=2, eos_token_id=2))
    model.train()  # evaluate_cases must switch dropout off itself, and restore the mode
    _, cases = build_scenario(tokenizer)
    cases = cases + [case("c", "{} is employed in", "Cy", "Paris", "Rome",
                          paraphrases=["Cy works in", "Cy calls home"], neighborhood=["Bob lives in"])]
    one = evaluate_cases(model, tokenizer, cases, batch_size=1).per_case
    many = evaluate_cases(model, tokenizer, cases, batch_size=64).per_case
    assert model.training
    metrics = ["es", "ps", "ns", "ea", "pa", "na"]
    pd.testing.assert_frame_equal(one[["case_id", *metrics]], many[["case_id", *metrics]])
    raw = ["edit_nll_new", "edit_nll_true", "paraphrase_p_new", "neighborhood_p_true"]
    np.testing.assert_allclose(one[raw].to_numpy(float), many[raw].to_numpy(float), rtol=1e-5, atol=1e-6)
    # a random model is a valid model: probabilities are proper and below 1
    assert ((many["edit_p_new"] > 0) & (many["edit_p_new"] < 1)).all()


def test_encode_target_drops_sentencepiece_lone_space_token():
    """Llama-2-style tokenizers turn " Paris" into ["▁", "▁Paris"]; the lone "▁" is not the answer."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "▁", "P", "a", "r", "i", "s"])}
    merges = [("▁", "P"), ("▁P", "a"), ("▁Pa", "r"), ("▁Par", "i"), ("▁Pari", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    raw = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(raw) == ["▁", "▁Paris"]
    assert tokenizer.convert_ids_to_tokens(encode_target(tokenizer, "Paris")) == ["▁Paris"]

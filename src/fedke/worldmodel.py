"""The world model: a small GPT-2 that fedke trains from a fresh config until it knows the world.

``load_world_model()`` returns the cached model for a (world, model) config or trains it:

* a word-level tokenizer built from the world's vocabulary (no download), with a BOS token;
* a ``transformers.GPT2LMHeadModel`` from a fresh ``GPT2Config``;
* trained on (prompt, object) pairs of every fact and every template not held out for that
  pair, with the loss on the object token plus ``lm_loss_weight`` x the LM loss on the rest,
  some prompts preceded by a filler sentence (as MEMIT's context prefixes will be);
* cached as a directory ``<cache>/world-models/<key>/`` holding ``model.safetensors``,
  ``config.json``, the tokenizer files, ``world.json`` and ``training.json`` (accuracies, time),
  with ``key`` a hash of the world's and the model's parameters. ``GPT2LMHeadModel.from_pretrained``
  and ``AutoTokenizer.from_pretrained`` load the directory on their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fedke.cache import atomic_directory, atomic_write_json, cache_root
from fedke.data.world import World, WorldConfig, make_world

log = logging.getLogger(__name__)

PAD, UNK, BOS = "[PAD]", "[UNK]", "<|endoftext|>"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorldModelConfig:
    """Architecture and training of the world model (part of its cache key)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    max_epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    lm_loss_weight: float = 0.1
    prefix_probability: float = 0.25
    stop_train_accuracy: float = 0.98
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldModel:
    """A trained world model with its tokenizer and the world it knows."""

    model: "torch.nn.Module"
    tokenizer: object
    world: World
    path: Path
    report: dict = field(default_factory=dict)


def build_tokenizer(vocabulary: Sequence[str]):
    """A word-level tokenizer over ``vocabulary`` that prepends a BOS token, like GPT-2's
    ``<|endoftext|>``. Words are split on whitespace; targets tokenise the same with or
    without a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, UNK: 1, BOS: 2}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=4096,
    )


def cache_key(world_config: WorldConfig, model_config: WorldModelConfig) -> str:
    raw = f"v{FORMAT_VERSION}/{world_config.fingerprint()}/{model_config.fingerprint()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_world_model(world_config: WorldConfig | None = None, model_config: WorldModelConfig | None = None,
                     *, cache_dir: str | Path | None = None, progress: bool = True,
                     device: str | torch.device | None = None) -> WorldModel:
    """The trained world model for these configs: loaded from the cache, or trained and cached."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    world_config = world_config or WorldConfig()
    model_config = model_config or WorldModelConfig()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / "world-models" / cache_key(world_config, model_config)
    world = make_world(world_config)
    if not (path / "training.json").exists():
        log.info("training the world model for world %s into %s", world_config.fingerprint(), path)
        with atomic_directory(path) as tmp:
            model, tokenizer, report = train_world_model(world, model_config, progress=progress, device=device)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "world.json").write_text(world.to_json())
            atomic_write_json(tmp / "training.json", report)
    model = GPT2LMHeadModel.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    report = json.loads((path / "training.json").read_text())
    return WorldModel(model, tokenizer, world, path, report)


# ---------------------------------------------------------------------- training
def _encode(tokenizer, prompt: str, obj: str, prefix: str | None) -> tuple[list[int], int]:
    text = f"{prefix} {prompt}" if prefix else prompt
    ids = tokenizer(text)["input_ids"] + tokenizer(obj, add_special_tokens=False)["input_ids"]
    return ids, len(ids) - 1  # index of the object token


def _batches(examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random, shuffle: bool):
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        target_pos = torch.tensor([pos for _, pos in chunk])
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        yield input_ids, mask, target_pos


def _loss(model, input_ids, mask, target_pos, lm_weight: float) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    valid = mask[:, 1:].bool()
    is_object = torch.zeros_like(valid)
    is_object[torch.arange(len(target_pos)), target_pos - 1] = True
    object_loss = token_loss[is_object].mean()
    rest = valid & ~is_object
    lm_loss = token_loss[rest].sum() / rest.sum().clamp(min=1)
    return object_loss + lm_weight * lm_loss


@torch.inference_mode()
def object_accuracy(model, tokenizer, examples: Sequence[tuple[str, str]], *, batch_size: int = 512,
                    prefix: str | None = None) -> float:
    """Top-1 accuracy of the object token after each prompt (fraction in [0, 1])."""
    if not examples:
        return float("nan")
    encoded = [_encode(tokenizer, p, o, prefix) for p, o in examples]
    device = next(model.parameters()).device
    correct = 0
    for input_ids, mask, target_pos in _batches(encoded, batch_size, random.Random(0), shuffle=False):
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        rows = torch.arange(len(target_pos))
        predicted = logits[rows, target_pos.to(device) - 1].argmax(-1)
        correct += int((predicted == input_ids[rows, target_pos.to(device)]).sum())
    return correct / len(encoded)


def train_world_model(world: World, config: WorldModelConfig, *, progress: bool = True,
                      device: str | torch.device | None = None):
    """Train a fresh GPT-2 on the world's facts. Returns (model, tokenizer, report)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = build_tokenizer(world.vocabulary())
    gpt_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(gpt_config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device)

    train_pairs = world.training_examples()
    heldout_pairs = world.heldout_examples()
    filler = list(world.filler)
    examples = [
        _encode(tokenizer, prompt, obj, rng.choice(filler) if rng.random() < config.prefix_probability else None)
        for prompt, obj in train_pairs
    ]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.max_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.1, 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    probe = rng.sample(train_pairs, min(2000, len(train_pairs)))
    history = []
    bar = tqdm(total=total_steps, desc="training world model", disable=not progress, unit="step")
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        running = 0.0
        for input_ids, mask, target_pos in _batches(examples, config.batch_size, rng, shuffle=True):
            loss = _loss(model, input_ids.to(device), mask.to(device), target_pos.to(device), config.lm_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item()
            bar.update(1)
        model.eval()
        accuracy = object_accuracy(model, tokenizer, probe)
        history.append({"epoch": epoch, "loss": running / steps_per_epoch, "probe_train_acc": accuracy})
        bar.set_postfix(loss=f"{running / steps_per_epoch:.3f}", acc=f"{accuracy:.3f}")
        log.info("epoch %d: loss %.3f, probe accuracy %.3f (%.0f s)", epoch, running / steps_per_epoch, accuracy,
                 time.perf_counter() - started)
        if accuracy >= config.stop_train_accuracy:
            break
    bar.close()
    model.eval()
    train_acc = object_accuracy(model, tokenizer, train_pairs)
    heldout_acc = object_accuracy(model, tokenizer, heldout_pairs)
    report = {
        "world": asdict(world.config), "model": asdict(config),
        "train_acc": 100 * train_acc, "heldout_acc": 100 * heldout_acc,
        "epochs": epoch, "seconds": time.perf_counter() - started,
        "n_facts": len(world.facts), "n_train_examples": len(train_pairs), "n_heldout_examples": len(heldout_pairs),
        "n_params": sum(p.numel() for p in model.parameters()), "history": history,
    }
    log.info("world model: train acc %.1f%%, held-out acc %.1f%% after %d epochs (%.0f s)",
             report["train_acc"], report["heldout_acc"], epoch, report["seconds"])
    return model.cpu(), tokenizer, report

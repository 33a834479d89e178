"""Text for covariance statistics that exists on every fresh machine, without downloads.

MEMIT's ``C = E[k k^T]`` is computed over generic text (the reference used 100k Wikipedia
articles, which users can no longer download). Three sources need nothing but Python and the model:

* ``"stdlib"``: CPython's own English prose, ``pydoc_data.topics`` (the language reference as
  ``help()`` shows it: about 113k SmolLM2 tokens), split into paragraphs.
* ``"model"``: text sampled from the model itself (top-k sampling from its BOS token, seeded).
* a path: a user's text file (one passage per non-empty line) or a directory of ``.txt`` files.

:func:`covariance_passages` takes passages in a seeded order until ``max_tokens`` tokens are
reached, so the same source, size and seed give the same text everywhere (and so the same cache key).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

TEXT_SOURCES = ("stdlib", "model")


def stdlib_passages() -> list[str]:
    """Paragraphs of ``pydoc_data.topics`` with at least 80 characters, in a fixed order."""
    import pydoc_data.topics

    passages = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) >= 80:
                passages.append(text)
    return passages


@torch.no_grad()
def model_passages(model, tokenizer, max_tokens: int, *, length: int = 128, batch_size: int = 16,
                   top_k: int = 40, seed: int = 0, progress: bool = False) -> list[str]:
    """``max_tokens`` tokens sampled from ``model`` in passages of ``length`` (top-k, seeded generator)."""
    from tqdm.auto import tqdm

    import inspect

    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = min(length, positions - 1) if positions else length
    # transformers 5 renames the KV-cache argument ``past_key_values`` to ``cache``
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    passages: list[str] = []
    n_batches = -(-max_tokens // (length * batch_size))
    for _ in tqdm(range(n_batches), desc="sampling text", unit="batch", disable=not progress):
        ids = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
        past = None
        step_input = ids
        for _ in range(length):
            out = model(input_ids=step_input, use_cache=True, **{cache_key: past})
            past = getattr(out, "cache", None) or out.past_key_values
            top = out.logits[:, -1].float().cpu().topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            step_input = top.indices.gather(1, choice).to(device)
            ids = torch.cat([ids, step_input], dim=1)
        passages += [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in ids]
    return [p for p in passages if p]


def file_passages(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or of every ``.txt`` file under a directory (sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"covariance text {str(path)!r} does not exist (expected 'stdlib', 'model', "
                                "a text file or a directory of .txt files)")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    passages = [line.strip() for file in files for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not passages:
        raise ValueError(f"covariance text {str(path)!r} holds no text")
    return passages


def take_tokens(passages: Sequence[str], tokenizer, max_tokens: int, *, max_length: int = 256,
                seed: int = 0) -> list[str]:
    """Passages in a seeded order until they hold ``max_tokens`` tokens (each counted up to ``max_length``,
    as :func:`fedke.stats.compute_layer_stats` truncates them)."""
    order = list(passages)
    random.Random(seed).shuffle(order)
    taken, total = [], 0
    for passage in order:
        if total >= max_tokens:
            break
        taken.append(passage)
        total += min(len(tokenizer(passage)["input_ids"]), max_length)
    return taken


def covariance_passages(source: str, model, tokenizer, max_tokens: int, *, seed: int = 0,
                        progress: bool = False) -> list[str]:
    """The passages of a covariance text ``source`` (``"stdlib"``, ``"model"`` or a path), ``max_tokens`` long."""
    if max_tokens < 1:
        raise ValueError(f"covariance tokens must be at least 1, got {max_tokens}")
    if source == "stdlib":
        return take_tokens(stdlib_passages(), tokenizer, max_tokens, seed=seed)
    if source == "model":
        return model_passages(model, tokenizer, max_tokens, seed=seed, progress=progress)
    return take_tokens(file_passages(source), tokenizer, max_tokens, seed=seed)


def source_key(source: str, max_tokens: int, seed: int = 0) -> str | None:
    """A cache name for a built-in covariance text; None for a path (the cache then keys it by a hash
    of the text itself, :func:`fedke.stats.text_fingerprint`)."""
    return f"{source}-{max_tokens}-s{seed}" if source in TEXT_SOURCES else None

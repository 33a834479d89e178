"""Covariance statistics C = E[k k^T] of the edited layers' inputs, over any local text.

MEMIT's ``lam * C`` keeps an edit from disturbing what the layer already stores. The reference
code computes C over 100k Wikipedia articles that users can no longer download; fedke computes
it from whatever local text it is given (the world's filler text by default), streamed in
batches with a progress bar, accumulating the unnormalised sum of ``k k^T`` in float64 and a
token count: memory is O(d_in^2) whatever the corpus size.

Each layer's statistics are cached as one safetensors file holding ``sum_kkt`` and its
metadata (model fingerprint, layer, token count, dtype, text source); a cached layer is never
recomputed, and a file written for another model is refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedke.cache import atomic_write_bytes, cache_root
from fedke.editing.presets import get_module
from fedke.editing.weights import layer_shape

log = logging.getLogger(__name__)
STATS_FORMAT = "fedke.layer_stats/1"


class StatsError(ValueError):
    """A statistics file that does not belong to this model or layer, or is unreadable."""


@dataclass(frozen=True)
class LayerStats:
    """The second moment of one layer's inputs: ``sum_kkt / count = E[k k^T]``."""

    layer: str
    sum_kkt: np.ndarray
    count: int
    model_fingerprint: str
    source: str

    @property
    def covariance(self) -> np.ndarray:
        """C = E[k k^T] (uncentred), float64."""
        return self.sum_kkt / max(self.count, 1)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A stable hash of a model's config and weights (a strided sample of every tensor)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to(device="cpu", dtype=torch.float64).numpy()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:24]


def text_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _stats_path(root: Path, fingerprint: str, source: str, layer: str) -> Path:
    return root / "stats" / fingerprint / source / f"{layer}.safetensors"


def save_layer_stats(stats: LayerStats, path: str | Path) -> None:
    from safetensors.numpy import save

    metadata = {
        "format": STATS_FORMAT, "layer": stats.layer, "count": str(stats.count),
        "model_fingerprint": stats.model_fingerprint, "source": stats.source, "dtype": "float64",
        "d_in": str(stats.sum_kkt.shape[0]),
    }
    atomic_write_bytes(path, save({"sum_kkt": np.ascontiguousarray(stats.sum_kkt)}, metadata=metadata))


def load_layer_stats(path: str | Path, *, model_fingerprint: str | None = None, layer: str | None = None) -> LayerStats:
    """Load one layer's statistics, refusing a file made for another model or layer."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            sum_kkt = handle.get_tensor("sum_kkt")
    except Exception as err:  # safetensors raises several types for a bad file
        raise StatsError(f"cannot read statistics file {path}: {err}") from None
    if metadata.get("format") != STATS_FORMAT:
        raise StatsError(f"{path} is not a fedke statistics file (format {metadata.get('format')!r})")
    if model_fingerprint is not None and metadata.get("model_fingerprint") != model_fingerprint:
        raise StatsError(f"statistics file {path} was computed for model {metadata.get('model_fingerprint')}, "
                         f"not for this model ({model_fingerprint}); delete it or point to the right cache")
    if layer is not None and metadata.get("layer") != layer:
        raise StatsError(f"statistics file {path} holds layer {metadata.get('layer')!r}, not {layer!r}")
    return LayerStats(metadata["layer"], sum_kkt.astype(np.float64), int(metadata["count"]),
                      metadata["model_fingerprint"], metadata.get("source", ""))


class _LayersDone(Exception):
    """Raised by the last statistics hook of a forward pass to skip the layers above it."""


def _batches(texts: Sequence[str], batch_size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), batch_size):
        yield list(texts[start:start + batch_size])


@torch.inference_mode()
def compute_layer_stats(model: torch.nn.Module, tokenizer, layers: Sequence[str], texts: Iterable[str], *,
                        batch_size: int = 32, max_length: int = 256, progress: bool = True,
                        source: str | None = None, fingerprint: str | None = None) -> dict[str, LayerStats]:
    """Stream ``texts`` through the model once and accumulate ``sum k k^T`` at every layer's input.

    Each forward pass stops once the last wanted layer's input is read (the layers above it and
    the LM head are never run: on SmolLM2 with layers 4-8 of 30 that is about 3x less work)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to compute covariance statistics from")
    fingerprint = fingerprint or model_fingerprint(model)
    source = source or text_fingerprint(texts)
    device = next(model.parameters()).device
    sums = {name: torch.zeros(layer_shape(model, name)[1], layer_shape(model, name)[1], dtype=torch.float64,
                              device=device) for name in layers}
    mask_holder: dict[str, torch.Tensor] = {}

    fired: set[str] = set()

    def hook_for(name: str):
        def hook(_module, inputs):
            keys = inputs[0].reshape(-1, inputs[0].shape[-1])[mask_holder["mask"]].to(torch.float64)
            sums[name].addmm_(keys.T, keys)
            fired.add(name)
            if len(fired) == len(sums):  # every wanted layer is done: the layers above are not needed
                raise _LayersDone
        return hook

    handles = [get_module(model, name).register_forward_pre_hook(hook_for(name)) for name in layers]
    count = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        bar = tqdm(total=len(texts), desc="covariance statistics", unit="text", disable=not progress)
        for batch in _batches(texts, batch_size):
            encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in batch]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
            mask_holder["mask"] = attention.reshape(-1).bool().to(device)
            fired.clear()
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            except _LayersDone:
                pass
            count += int(attention.sum())
            bar.update(len(batch))
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    return {name: LayerStats(name, sums[name].cpu().numpy(), count, fingerprint, source) for name in layers}


def _cached_layer_stats(root: Path, fingerprint: str, source: str, layers: Sequence[str]) -> dict[str, LayerStats]:
    """The layers of ``layers`` whose statistics are in the cache (checked against model and layer)."""
    found = {}
    for name in layers:
        path = _stats_path(root, fingerprint, source, name)
        if path.exists():
            found[name] = load_layer_stats(path, model_fingerprint=fingerprint, layer=name)
    return found


def layer_covariances(model: torch.nn.Module, tokenizer, layers: Sequence[str], texts: Iterable[str], *,
                      source: str | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                      batch_size: int = 32, max_length: int = 256) -> dict[str, np.ndarray]:
    """C = E[k k^T] for each layer, from the cache when there, computed (and cached) otherwise.

    ``source`` names the text (e.g. ``"world-<fingerprint>"`` or a file list's hash); by default
    the hash of the text itself. Only the layers missing from the cache are computed.
    """
    texts = list(texts)
    source = source or text_fingerprint(texts)
    fingerprint = model_fingerprint(model)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    found = _cached_layer_stats(root, fingerprint, source, layers)
    missing = [name for name in layers if name not in found]
    if missing:
        log.info("computing covariance statistics of %s over %d texts", missing, len(texts))
        computed = compute_layer_stats(model, tokenizer, missing, texts, batch_size=batch_size,
                                       max_length=max_length, progress=progress, source=source,
                                       fingerprint=fingerprint)
        for name, stats in computed.items():
            save_layer_stats(stats, _stats_path(root, fingerprint, source, name))
        found.update(computed)
    return {name: found[name].covariance for name in layers}


def knowledge_key_grams(editor, requests: Sequence, *, cache_dir: str | Path | None = None,
                        progress: bool = True, batch_size: int = 256) -> dict[str, np.ndarray]:
    """``K0 K0^T`` per edited layer over the keys of facts to preserve, cached like the covariances.

    ``editor`` is a :class:`fedke.editing.MemitEditor`; ``requests`` state the facts the model
    holds (prompt, subject; the targets are not used). The keys are those an edit of these requests
    would use (:meth:`~fedke.editing.MemitEditor.key_gram`: the fact token, averaged over the
    context prefixes), so the cache is keyed by the model, the prompts, the fact token and the prefixes.
    """
    digest = hashlib.sha256()
    digest.update(editor.config.fact_token.encode())
    for template in editor.context_templates():
        digest.update(template.encode() + b"\x00")
    for request in requests:
        digest.update(request.prompt.encode() + b"\x00" + request.subject.encode() + b"\n")
    source = f"knowledge-{digest.hexdigest()[:16]}"
    fingerprint = model_fingerprint(editor.model)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    found = _cached_layer_stats(root, fingerprint, source, editor.layer_names)
    if len(found) == len(editor.layer_names):
        return {name: stats.sum_kkt for name, stats in found.items()}
    log.info("computing knowledge keys of %d facts for %s", len(requests), editor.layer_names)
    grams = editor.key_gram(list(requests), batch_size=batch_size, progress=progress)
    for name, gram in grams.items():
        save_layer_stats(LayerStats(name, gram, len(requests), fingerprint, source),
                         _stats_path(root, fingerprint, source, name))
    return grams

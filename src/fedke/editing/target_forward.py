"""Target optimisation's forward passes: logits at the loss positions with a shift ``delta`` added
at each row's fact token of the last edited block's output.

:class:`_WholeModel` runs the whole model every step (any architecture). :class:`_UpperStack`
replays only the blocks above the last edited layer from that layer's output, computed once.
:class:`_ByWidth` runs either per group of rows of one width (or per fixed-shape chunk, for
batch-invariant results). Used by :class:`fedke.editing.memit.MemitEditor`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from fedke.editing.presets import LayerPreset, get_module, num_layers

#: Target optimisation groups rows by their length rounded up to this many tokens (:class:`_ByWidth`).
WIDTH_STEP = 8
#: The fewest rows a matrix product of target optimisation has (:func:`_width_groups`, :func:`_lm_head_rows`).
MIN_GEMM_ROWS = 32
#: Tokens in one chunk of rows of one width under ``batch_invariant`` (:func:`_width_groups`):
#: measured on SmolLM2 (2 cores), 128 and 512 cost more target time at 2 and 40 requests.
CHUNK_TOKENS = 256


@dataclass
class _Rows:
    """Token rows of a forward pass, each row's fact token, and the (row, position) pairs whose
    logits the loss reads."""

    input_ids: torch.Tensor  # (R, W)
    attention_mask: torch.Tensor
    lookups: torch.Tensor  # (R,)
    loss_rows: torch.Tensor  # (P,)
    loss_positions: torch.Tensor


class _ReplayMismatch(RuntimeError):
    """The replayed upper blocks do not reproduce the model's logits (an architecture whose forward
    does more than blocks, final norm and LM head)."""


class _TargetForward(Protocol):
    """Logits ``(P, V)`` at the loss positions with ``delta_rows`` (R, d) added at each row's fact
    token of the last edited block's output. ``h_lookup`` (R, d) is that output without delta and
    ``initial_logits`` (P, V) the logits without delta."""

    h_lookup: torch.Tensor
    initial_logits: torch.Tensor

    def __call__(self, delta_rows: torch.Tensor | None) -> torch.Tensor: ...


class _WholeModel:
    """The whole model every step, delta added by a forward hook on the last edited block."""

    def __init__(self, model: torch.nn.Module, preset: LayerPreset, rows: _Rows) -> None:
        self.model, self.rows = model, rows
        self.block = get_module(model, preset.block_name(preset.layers[-1]))
        self.index = torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device)
        with torch.no_grad():
            self.initial_logits = self(None)

    def __call__(self, delta_rows: torch.Tensor | None) -> torch.Tensor:
        rows, at = self.rows, (self.index, self.rows.lookups)

        def add_delta(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if delta_rows is None:
                self.h_lookup = hidden[at].detach().clone()
                return output
            hidden = hidden.index_put(at, hidden[at] + delta_rows.to(hidden.dtype))
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        handle = self.block.register_forward_hook(add_delta)
        try:
            logits = self.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False).logits
        finally:
            handle.remove()
        return logits[rows.loss_rows, rows.loss_positions]


class _UpperStack:
    """Only what the loss depends on: the blocks above the last edited layer, replayed each step from
    that layer's output (computed once: the layers below never see delta), with the final norm and
    the LM head at the loss positions only.

    One forward pass of the whole model (without a key-value cache, which a replay would extend)
    records the last edited block's output and the arguments every upper block is called with
    (attention masks, position embeddings...); a step calls the upper blocks with those arguments
    and the new hidden state. The replay is checked against the
    model: its logits without delta must equal the model's own (:class:`_ReplayMismatch` otherwise).
    """

    def __init__(self, model: torch.nn.Module, preset: LayerPreset, rows: _Rows, check: bool = True,
                 fixed_shapes: bool = False) -> None:
        self.rows, self.fixed_shapes = rows, fixed_shapes
        last = preset.layers[-1]
        self.blocks = [get_module(model, preset.block_name(i)) for i in range(last + 1, num_layers(model))]
        self.final_norm = get_module(model, preset.final_norm)
        self.lm_head = get_module(model, preset.lm_head)
        self.at = (torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device), rows.lookups)
        self.calls: list[tuple[tuple, dict]] = [((), {})] * len(self.blocks)
        self.hidden_names: list[str] = []  # set when calls are all keywords (:class:`_SuffixStack`)
        captured: dict[str, torch.Tensor] = {}

        def grab_output(_module, _inputs, output):
            captured["h"] = (output[0] if isinstance(output, tuple) else output).detach()

        def grab_call(index: int):
            def hook(_module, args, kwargs):
                self.calls[index] = (tuple(args), dict(kwargs))
            return hook

        handles = [get_module(model, preset.block_name(last)).register_forward_hook(grab_output)]
        handles += [block.register_forward_pre_hook(grab_call(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                base = model.base_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            self.initial_logits = _lm_head_rows(self.lm_head, base.last_hidden_state[rows.loss_rows, rows.loss_positions],
                                                fixed_shapes)
        self.h_last = captured["h"]
        self.h_lookup = self.h_last[self.at].clone()
        if check:
            self._check_replay(model)

    def _check_replay(self, model: torch.nn.Module) -> None:
        """The logits without delta equal the model's own (one row) and the replay's."""
        rows = self.rows
        with torch.no_grad():
            first = int(rows.loss_rows[0])
            own = model(input_ids=rows.input_ids[first:first + 1], attention_mask=rows.attention_mask[first:first + 1],
                        use_cache=False).logits[0]
        on_first = rows.loss_rows == first
        _check_close("the model's own logits", self.initial_logits[on_first], own[rows.loss_positions[on_first]])
        with torch.no_grad():
            _check_close("the replayed upper blocks' logits", self(None), self.initial_logits)

    def __call__(self, delta_rows: torch.Tensor | None, **extra) -> torch.Tensor:
        """Logits at the loss positions; ``extra`` keywords go to every block (a cache to record)."""
        hidden = self.h_last
        if delta_rows is not None:
            hidden = hidden.index_put(self.at, hidden[self.at] + delta_rows.to(hidden.dtype))
        for index, (block, (args, kwargs)) in enumerate(zip(self.blocks, self.calls)):
            kwargs = {**kwargs, **extra}
            if self.hidden_names:  # every argument named (:func:`_as_keywords`)
                output = block(**{**kwargs, self.hidden_names[index]: hidden})
            elif "hidden_states" in kwargs:
                output = block(*args, **{**kwargs, "hidden_states": hidden})
            else:
                output = block(hidden, *args[1:], **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return _lm_head_rows(self.lm_head, self.final_norm(hidden[self.rows.loss_rows, self.rows.loss_positions]),
                             self.fixed_shapes)


class _PrefixCache:
    """The attention cache an upper block sees in a suffix replay: each layer's keys and values of
    the first ``start`` positions, recorded once (``recording``) and then prepended to the
    suffix's own. Duck-typed on what HF attention layers call: ``update(keys, values, layer_idx, ...)``."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.recording = True
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.prefix[layer_idx] = (keys[:, :, : self.start].detach(), values[:, :, : self.start].detach())
            return keys, values
        before_keys, before_values = self.prefix[layer_idx]
        return torch.cat([before_keys, keys], dim=-2), torch.cat([before_values, values], dim=-2)


def _as_keywords(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A recorded block call with every argument named (so a cache can be passed by keyword)."""
    signature = inspect.signature(block.forward)
    named: dict = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return (), named


#: The keyword under which HF blocks take their attention cache, newest first.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _SuffixStack(_UpperStack):
    """:class:`_UpperStack` on each row's suffix only, all rows in one forward.

    Attention is causal, so a row's positions before its fact token never see delta: above the last
    edited layer they are the same at every step. Each upper block's keys and values there are
    recorded once; a step runs the blocks on positions ``lookup_r .. lookup_r + S - 1`` of every
    row ``r`` (``S`` the longest suffix), attending to the row's recorded prefix, with the row's own
    rotary positions. Rows of every width and fact token share one forward: no padding to a batch
    mate's width and no per-group overhead.

    Needs blocks that take an attention cache (``cache=`` or ``past_key_values=``; HF GPT-2,
    GPT-J, Llama, Mistral, Qwen) and right-padded rows. Checked at construction against the full
    replay, with and without a delta; :class:`_ReplayMismatch` when they differ (the caller then
    replays every position).
    """

    def __init__(self, model: torch.nn.Module, preset: LayerPreset, rows: _Rows, check: bool = True,
                 fixed_shapes: bool = False) -> None:
        """``fixed_shapes``: the rows are one chunk of :func:`_suffix_buckets` (one bucket of prefix
        and suffix lengths, a fixed number of rows); the prefix slots and the suffix length are then
        the bucket's, so every product has the bucket's shape whatever the rows' batch mates."""
        super().__init__(model, preset, rows, check=False, fixed_shapes=fixed_shapes)
        mask = rows.attention_mask.bool()
        lengths = mask.sum(1)
        width = mask.shape[1]
        positions = torch.arange(width, device=mask.device)
        if not torch.equal(mask, positions[None] < lengths[:, None]):
            raise _ReplayMismatch("rows are not right-padded")
        lookups = rows.lookups
        if bool((rows.loss_positions < lookups[rows.loss_rows]).any()):
            raise _ReplayMismatch("a loss position lies before its row's fact token")
        names = [next((n for n in _CACHE_KWARGS if n in inspect.signature(b.forward).parameters), None)
                 for b in self.blocks]
        if None in names:
            raise _ReplayMismatch("an upper block takes no attention cache")
        self.cache_kwarg = names[0] if names else "cache"
        self.calls = [_as_keywords(block, args, kwargs) for block, (args, kwargs) in zip(self.blocks, self.calls)]
        self.hidden_names = [next(iter(inspect.signature(block.forward).parameters)) for block in self.blocks]
        self.prefix_slots = max(1, int(lookups.max()))
        self.suffix = int((lengths - lookups).max())
        if fixed_shapes:  # the bucket's sizes (:func:`_suffix_buckets`), the same for every chunk of it
            self.prefix_slots, self.suffix = _round_up(self.prefix_slots), _round_up(self.suffix)
        steps = torch.arange(self.suffix, device=mask.device)
        self.index = (lookups[:, None] + steps[None]).clamp(max=width - 1)  # (R, S) positions of the suffix
        self.cache = _PrefixCache(self.prefix_slots)
        with torch.no_grad():  # record every prefix's keys and values: one full replay through the cache
            _UpperStack.__call__(self, None, **{self.cache_kwarg: self.cache})
        self.cache.recording = False
        self.suffix_calls = self._suffix_calls()
        self.loss_steps = rows.loss_positions - lookups[rows.loss_rows]
        if check:  # the model's own logits, the suffix replay's without delta, then with one
            self._check_replay(model)
            with torch.no_grad():
                probe = 1e-2 * self.h_lookup.norm(dim=-1, keepdim=True) * torch.randn(
                    self.h_lookup.shape, generator=torch.Generator().manual_seed(0)).to(self.h_lookup)
                _check_close("the suffix replay's logits with a delta", self(probe), _UpperStack.__call__(self, probe))

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (R or 1, W, ...) at each row's suffix positions: (R, S, ...)."""
        tensor = tensor.expand(self.index.shape[0], *tensor.shape[1:])
        index = self.index.reshape(*self.index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
        return tensor.gather(1, index)

    def _suffix_mask(self) -> torch.Tensor:
        """The additive attention mask of a suffix step, (R, 1, S, P + S): queries are each row's
        suffix positions, keys its recorded prefix slots (valid below the row's fact token) and then
        its suffix (causal, valid within the row's length). The same for every block."""
        rows, dtype, device = self.rows, self.h_last.dtype, self.h_last.device
        lengths = rows.attention_mask.sum(1)
        steps = torch.arange(self.suffix, device=device)
        prefix_ok = torch.arange(self.prefix_slots, device=device)[None, :] < rows.lookups[:, None]  # (R, P)
        suffix_ok = (rows.lookups[:, None] + steps[None]) < lengths[:, None]  # (R, S)
        causal = steps[None, :] <= steps[:, None]  # (S, S)
        keep = torch.cat([prefix_ok[:, None, :].expand(-1, self.suffix, -1),
                          causal[None] & suffix_ok[:, None, :]], dim=-1)  # (R, S, P + S)
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)[:, None]

    def _suffix_calls(self) -> list[dict]:
        """Every block's recorded call cut to the suffix: the mask above, the rows' own positions
        (tensors the model passes to every block, e.g. rotary embeddings, gathered once), the cache."""
        mask, gathered = self._suffix_mask(), {}

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in gathered:
                gathered[id(tensor)] = self._gather(tensor)
            return gathered[id(tensor)]

        calls = []
        for _, recorded in self.calls:
            kwargs = dict(recorded)
            kwargs["attention_mask"] = mask
            if kwargs.get("position_embeddings") is not None:
                kwargs["position_embeddings"] = tuple(gather(part) for part in kwargs["position_embeddings"])
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = gather(kwargs["position_ids"])
            kwargs.pop("cache_position", None)
            kwargs.pop("use_cache", None)
            kwargs[self.cache_kwarg] = self.cache
            calls.append(kwargs)
        return calls

    def __call__(self, delta_rows: torch.Tensor | None) -> torch.Tensor:
        hidden = self._gather(self.h_last)
        if delta_rows is not None:  # every row's fact token is its suffix's first position
            hidden = torch.cat([hidden[:, :1] + delta_rows.to(hidden.dtype)[:, None], hidden[:, 1:]], dim=1)
        for block, name, kwargs in zip(self.blocks, self.hidden_names, self.suffix_calls):
            output = block(**{**kwargs, name: hidden})
            hidden = output[0] if isinstance(output, tuple) else output
        return _lm_head_rows(self.lm_head, self.final_norm(hidden[self.rows.loss_rows, self.loss_steps]),
                             self.fixed_shapes)


class _ByWidth:
    """A forward per group (or fixed-shape chunk) of rows of the same width, its length rounded up
    to ``WIDTH_STEP`` tokens (:func:`_width_groups`): no row pays for a longer batch mate's
    padding."""

    def __init__(self, make: Callable[[_Rows, bool], _TargetForward], rows: _Rows, chunk_tokens: int,
                 grouping: Callable[[_Rows], list] | None = None) -> None:
        """``make(rows, first)`` builds one chunk's forward; ``first`` is True for the first chunk
        only (architecture checks need not run per chunk). ``chunk_tokens``: see :func:`_width_groups`;
        ``grouping(rows)``: other groups of the same form (:func:`_suffix_buckets`)."""
        self.parts: list[tuple[torch.Tensor, int, _TargetForward]] = []
        order = []
        groups = grouping(rows) if grouping is not None else _width_groups(rows.attention_mask, chunk_tokens)
        for members, width, padded in groups:
            fillers = len(padded) - len(members)
            local = torch.full((rows.input_ids.shape[0],), -1, dtype=torch.long, device=members.device)
            local[members] = torch.arange(len(members), device=members.device)
            reads = (local[rows.loss_rows] >= 0).nonzero().flatten()
            short = max(0, width - rows.input_ids.shape[1])  # a bucket wider than this batch: pad (masked)
            sub = _Rows(torch.nn.functional.pad(rows.input_ids[padded, :width], (0, short), value=0),
                        torch.nn.functional.pad(rows.attention_mask[padded, :width], (0, short), value=0),
                        rows.lookups[padded], local[rows.loss_rows[reads]], rows.loss_positions[reads])
            self.parts.append((members, fillers, make(sub, not self.parts)))
            order.append(reads)
        self.inverse = torch.argsort(torch.cat(order))  # concatenated part outputs -> loss order
        first = self.parts[0][2].h_lookup
        self.h_lookup = torch.empty(rows.input_ids.shape[0], *first.shape[1:], dtype=first.dtype, device=first.device)
        for members, _, forward in self.parts:
            self.h_lookup[members] = forward.h_lookup[: len(members)]
        self.initial_logits = torch.cat([forward.initial_logits for _, _, forward in self.parts])[self.inverse]

    def __call__(self, delta_rows: torch.Tensor | None) -> torch.Tensor:
        outputs = []
        for members, fillers, forward in self.parts:
            if delta_rows is None:
                outputs.append(forward(None))
            else:
                mine = delta_rows[members]
                outputs.append(forward(torch.cat([mine, mine.new_zeros(fillers, mine.shape[1])]) if fillers else mine))
        return torch.cat(outputs)[self.inverse]


def _chunks(members: torch.Tensor, tall: int, width: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``members`` cut into chunks of ``tall`` rows: ``(part, width, padded)``, ``padded`` being
    ``part`` plus fillers (copies of its first row, read by nothing) up to ``tall`` rows."""
    parts = [members[start:start + tall] for start in range(0, len(members), tall)]
    return [(part, width, torch.cat([part, part[:1].repeat(tall - len(part))])) for part in parts]


def _width_groups(attention_mask: torch.Tensor, chunk_tokens: int = 0) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Rows grouped by their length rounded up to WIDTH_STEP: ``(members, width, padded)``, where
    ``padded`` is ``members`` plus fillers (copies of its first row, read by nothing).

    ``chunk_tokens == 0``: one group per width, at least MIN_GEMM_ROWS tokens (BLAS rounds
    products of very few rows differently): no row pays for a longer batch mate's padding, and
    on GPT-2 a row's arithmetic depends on its own length only.

    ``chunk_tokens > 0``: every chunk of width ``w`` is exactly ``ceil(chunk_tokens / w)`` rows.
    Matrix products then have the same shapes whichever requests share a batch, and BLAS rounds
    a row the same way only when the product's shape is the same (MKL switches kernels on the
    row count: a row of ``x @ W`` with W 1536 x 576 differs in the last bit between 56 and 64
    rows). So a request's keys and targets are bit-for-bit the same edited alone, with others,
    or in another client's batch.
    """
    widths = -(-attention_mask.sum(1) // WIDTH_STEP) * WIDTH_STEP
    groups = []
    for width in sorted(set(widths.tolist())):
        members = (widths == width).nonzero().flatten()
        tall = -(-chunk_tokens // width) if chunk_tokens else max(len(members), -(-MIN_GEMM_ROWS // width))
        groups += _chunks(members, tall, int(width))
    return groups


def _round_up(n: int) -> int:
    """``n`` rounded up to a multiple of ``WIDTH_STEP`` (at least one step)."""
    return max(WIDTH_STEP, -(-n // WIDTH_STEP) * WIDTH_STEP)


def _suffix_buckets(rows: _Rows, chunk_tokens: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Fixed-shape chunks for :class:`_SuffixStack` under ``batch_invariant`` (as
    :func:`_width_groups` for the full replay): rows are bucketed by their prefix length (the fact
    token's position) and suffix length, each rounded up to ``WIDTH_STEP``; a chunk of bucket
    ``(P, S)`` is ``ceil(chunk_tokens / S)`` rows of width ``P + S`` (fillers: copies of its first
    row, read by nothing). A row's bucket depends on the row alone, so every product it enters has the
    same shape whichever requests share its batch: ``(members, width, padded)``."""
    lengths = rows.attention_mask.sum(1)
    keys = [(_round_up(int(lookup)), _round_up(int(length - lookup)))
            for lookup, length in zip(rows.lookups.tolist(), lengths.tolist())]
    groups = []
    for prefix, suffix in sorted(set(keys)):
        members = torch.tensor([i for i, key in enumerate(keys) if key == (prefix, suffix)], dtype=torch.long,
                               device=rows.lookups.device)
        tall = -(-chunk_tokens // suffix)
        groups += _chunks(members, tall, prefix + suffix)
    return groups


def _lm_head_rows(lm_head: torch.nn.Module, hidden: torch.Tensor, fixed: bool) -> torch.Tensor:
    """``lm_head(hidden)`` for rows ``(P, d)``, in one product at least MIN_GEMM_ROWS rows tall, or
    (``fixed``) in products of exactly MIN_GEMM_ROWS rows, the last one padded, so that a row's
    logits do not depend on how many rows share it (see :func:`_width_groups`)."""
    n = hidden.shape[0]
    tall = MIN_GEMM_ROWS if fixed else max(n, MIN_GEMM_ROWS)
    short = -n % tall
    if short:
        hidden = torch.cat([hidden, hidden[:1].expand(short, -1)])
    return torch.cat([lm_head(piece) for piece in hidden.split(tall)])[:n]


def _check_close(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-4 * scale):
        raise _ReplayMismatch(f"{what} differ from the whole model's (max |difference| "
                              f"{float((got.float() - expected.float()).abs().max()) if got.shape == expected.shape else 'n/a'})")

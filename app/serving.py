"""Text from the served model: continuous batching, every row with its own detox setting.

`Decoder` holds the running batch. Each `step` prefills waiting rows (at most `prefill_tokens` prompt tokens
per step, whole prompts first, packed into one sequence with a block-diagonal mask; a longer prompt is fed
alone in chunks over several steps with an eighth of the budget while others decode, so it cannot hold the
batch, and then decodes in a cache of its own, so the others' caches are never padded to its length), decodes
one token for every running row, merges the new rows into the batch's KV cache and lets the rows that ended
go (their cache rows are dropped with `index_select` at the next merge). On Llama models the decode tokens,
the new prompts and the chunk are one packed forward pass (the weights read once per step), attention
alone running per part (`_split_attention_forward`). The cache is one
`DynamicCache` of shape (rows, kv_heads, T, head_dim) per layer with a (rows, T) attention mask: rows of
different lengths are left-padded with masked zeros, and each row has its own position ids, so what a row
computes does not depend on its neighbours. Every row has its own seed (its own generator, one draw per
token), temperature, top-p, token budget and intervention (or none): each intervention in a forward pass is
one lm_head pre-hook whose row mask selects its rows, so detox on and off share a batch, the weights are
never copied and no second head exists. A prompt seen before (`PromptCache`) skips its prefill: its kept cache
rows join the batch and its first token comes from its kept lm_head input.

`Batcher` runs the decoder on a thread of its own and, before every step, admits waiting rows into the
running batch: first come first served, but a key holding its share of the batch waits while another key's
rows wait. The event loop only queues rows and receives outputs, so it stays free for other requests.
`decode_batch` runs a fixed set of requests through a decoder to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from app.sampling import sample_next_tokens
from eigenshift_core.generation import stop_token_ids
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, Tokenizer, lm_head_sha256, output_layer


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue; temperature 0 is greedy."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    intervention: Intervention | None = None
    # Streaming: called on the model thread with each token this row keeps (never the stop token), as it is
    # chosen; returning False ends the row there (its reader went away or saw a stop string). None costs nothing.
    on_token: Callable[[int], bool] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p of each chosen token under the served (possibly edited) distribution
    finish_reason: str  # "stop" (end of sequence) or "length"


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# One row, and the rows that share a cache.

@dataclass(eq=False)
class Row:
    """One request in the decoder: the prompt ids still to feed, its random stream, what it has produced."""

    request: GenerationRequest
    prompt: list[int]
    generator: torch.Generator
    ticket: _Ticket | None = None  # the `Batcher.generate` call it belongs to, and its index there
    index: int = 0
    wave: _Wave | None = None
    fed: int = 0  # tokens in this row's cache: the position of its next input
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"
    ended: bool = False

    @property
    def owner(self) -> str | None:
        """The API key's name it came from (None outside `Batcher.generate`)."""
        return self.ticket.key if self.ticket is not None else None

    def accept(self, token: int, logprob: float, stop: set[int]) -> None:
        """Take one chosen token: a stop token ends the row unkept; the budget or `on_token` may end it."""
        if token in stop:
            self.ended, self.finish = True, "stop"
            return
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.request.on_token is not None and not self.request.on_token(token):
            self.ended, self.finish = True, "stop"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.ended = True

    def output(self, tokenizer: Tokenizer) -> GenerationOutput:
        text = str(tokenizer.decode(self.tokens, skip_special_tokens=True))
        return GenerationOutput(text, self.tokens, self.logprobs, self.finish)


LONG_CHUNK_DIVISOR = 8  # a long prompt's chunk, while other rows decode: prefill budget / 8 tokens
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, each (rows, kv_heads, T, head_dim)


@dataclass(eq=False)
class _Block:
    """Rows that share one KV cache, in its batch order, and their (rows, T) attention mask (0: padding)."""

    rows: list[Row]
    cache: DynamicCache | None  # None only for a long prompt before its first chunk
    mask: torch.Tensor


def _tensors(cache: DynamicCache | None) -> KV:
    assert cache is not None, "a block joins the batch only once its prompt is fed"
    layers: KV = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            # sliding windows and the like keep state we cannot re-pad
            raise NotImplementedError(f"continuous batching needs full-attention caches, not {type(layer).__name__}")
        layers.append((layer.keys, layer.values))
    return layers


def _fill(cache: DynamicCache, layers: KV) -> DynamicCache:
    """`cache` holding these keys and values as they are (`DynamicCache(layers)` would copy each into place)."""
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _unpack(packed: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """(1, heads, T, head_dim) of one packed sequence -> (rows, heads, width, head_dim) at `index` (rows·width,),
    where index T (one past the end) reads zeros."""
    padded = torch.cat([packed[0], packed.new_zeros(packed.shape[1], 1, packed.shape[3])], dim=1)  # (heads, T+1, hd)
    return padded.index_select(1, index).unflatten(1, (rows, -1)).transpose(0, 1).contiguous()


@contextlib.contextmanager
def _rows_first(head: torch.nn.Module) -> Iterator[None]:
    """While inside: `head` takes a packed sequence's kept positions (1, rows, d) as rows (rows, 1, d). Its
    first pre-hook, so the interventions' per-row hooks see rows."""
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].transpose(0, 1), *args[1:]), prepend=True)
    try:
        yield
    finally:
        handle.remove()


# One forward pass per step (`Decoder._decode_and_feed`): the running rows' next tokens, the new prompts and
# the long prompt's chunk go in as one packed sequence (1, rows + T + chunk), so the weights are read once per
# step, not up to three times; only attention keeps them apart.

SPLIT_ATTENTION = "eigenshift_split"
SPLIT_MODEL_TYPES = ("llama",)  # attention layers that route through AttentionInterface with cache.update


@dataclass(eq=False)
class _SplitStep:
    """A packed sequence's layout: one decode token per batch row (`rows`), then the prompts (T), then maybe a
    chunk of the long prompt. Masks are bool, True where attended: decode_mask (rows, 1, 1, W + 1),
    prompt_mask (1, 1, T, T), chunk_mask (1, 1, chunk, fed + chunk) or None."""

    rows: int
    decode_mask: torch.Tensor
    prompt_mask: torch.Tensor
    chunk_mask: torch.Tensor | None
    cache: _SplitCache


class _SplitCache(DynamicCache):
    """The running rows' cache (rows, kv, W, hd per layer): a packed step's first `rows` keys and values
    append to it as (rows, kv, 1, hd); the next `prompts` are kept apart in `prompts` (1, kv, T, hd); the rest,
    a chunk of the long prompt, append to its own cache `chunk` (1, kv, fed, hd)."""

    def __init__(self, layers: KV, rows: int, prompts: int, chunk: DynamicCache | None) -> None:
        super().__init__()
        _fill(self, layers)
        self.rows, self.prompt_tokens = rows, prompts
        self.chunk = chunk if chunk is not None else DynamicCache()
        self.decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer (rows, kv, W + 1, hd)
        self.prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer (1, kv, T, hd)
        self.chunked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer (1, kv, fed + chunk, hd)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows, end = self.rows, self.rows + self.prompt_tokens  # key_states (1, kv, rows + T + chunk, hd)
        self.decoded[layer_idx] = super().update(key_states[0, :, :rows].transpose(0, 1).unsqueeze(2),
                                                 value_states[0, :, :rows].transpose(0, 1).unsqueeze(2), layer_idx)
        self.prompts[layer_idx] = (key_states[:, :, rows:end], value_states[:, :, rows:end])
        if key_states.shape[2] > end:
            self.chunked[layer_idx] = self.chunk.update(key_states[:, :, end:], value_states[:, :, end:], layer_idx)
        return key_states, value_states


def _split_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, *, eigenshift_split: _SplitStep | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa per part: each running row's token over its own cache, the prompts over themselves, the chunk over
    the long prompt's cache. query (1, heads, rows + T + chunk, hd) -> (1, rows + T + chunk, heads, hd), as
    transformers' attention functions return."""
    if eigenshift_split is None:  # any other forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    step, layer = eigenshift_split, int(module.layer_idx)  # type: ignore[arg-type]
    rows, end = step.rows, step.rows + step.cache.prompt_tokens
    cached_k, cached_v = step.cache.decoded[layer]
    decoded, _ = sdpa_attention_forward(module, query[0, :, :rows].transpose(0, 1).unsqueeze(2), cached_k,
                                        cached_v, step.decode_mask, **kwargs)  # (rows, 1, heads, hd)
    parts = [decoded.transpose(0, 1)]
    if end > rows:
        prompts_k, prompts_v = step.cache.prompts[layer]
        parts.append(sdpa_attention_forward(module, query[:, :, rows:end], prompts_k, prompts_v, step.prompt_mask,
                                            **kwargs)[0])
    if step.chunk_mask is not None:
        chunk_k, chunk_v = step.cache.chunked[layer]
        parts.append(sdpa_attention_forward(module, query[:, :, end:], chunk_k, chunk_v, step.chunk_mask,
                                            **kwargs)[0])
    return torch.cat(parts, dim=1), None


AttentionInterface.register(SPLIT_ATTENTION, _split_attention_forward)
# Any other forward pass of the model while a split one runs (another thread) gets sdpa's masks and attention.
AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _split_attention(model: torch.nn.Module) -> Iterator[None]:
    """While inside: the model's attention layers call `_split_attention_forward` (one forward pass)."""
    config: Any = model.config
    before = config._attn_implementation
    config._attn_implementation = SPLIT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _merge(blocks: Sequence[_Block], compact: bool) -> _Block | None:
    """One block of the rows of `blocks`, in order: ended rows dropped (when `compact`), columns that are
    padding in every row trimmed, the rest left-padded to a common length. None when no row is live."""
    if all(row.ended for block in blocks for row in block.rows):
        return None
    if len(blocks) == 1 and (not compact or not any(r.ended for r in blocks[0].rows)) and bool(blocks[0].mask[:, 0].any()):
        return blocks[0]  # nothing joined, left or to trim
    parts: list[tuple[list[Row], KV, torch.Tensor, torch.Tensor | None]] = []  # rows, layers, mask, rows to keep
    for block in blocks:
        keep = [i for i, row in enumerate(block.rows) if not (compact and row.ended)]
        if not keep:
            continue
        layers, mask = _tensors(block.cache), block.mask
        index = torch.tensor(keep, device=mask.device) if len(keep) < len(block.rows) else None
        if index is not None:
            mask = mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())  # the first column some row uses
        parts.append(([block.rows[i] for i in keep], [(k[:, :, first:], v[:, :, first:]) for k, v in layers],
                      mask[:, first:], index))
    if not parts:
        return None
    width = max(mask.shape[1] for _, _, mask, _ in parts)
    total = sum(len(rows) for rows, _, _, _ in parts)
    merged: KV = []
    for layer in range(len(parts[0][1])):
        sample = parts[0][1][layer][0]  # (rows, heads, T, head_dim)
        keys = sample.new_zeros(total, sample.shape[1], width, sample.shape[3])
        values = torch.zeros_like(keys)
        start = 0
        for rows, layers, mask, index in parts:  # each part copied once, into its rows and right-aligned columns
            k, v = layers[layer]
            if index is not None:
                k, v = k.index_select(0, index), v.index_select(0, index)
            keys[start : start + len(rows), :, width - mask.shape[1] :] = k
            values[start : start + len(rows), :, width - mask.shape[1] :] = v
            start += len(rows)
        merged.append((keys, values))
    mask = parts[0][2].new_zeros(total, width)
    start = 0
    for rows, _, part_mask, _ in parts:
        mask[start : start + len(rows), width - part_mask.shape[1] :] = part_mask
        start += len(rows)
    return _Block([row for p in parts for row in p[0]], _fill(DynamicCache(), merged), mask)


@contextlib.contextmanager
def _interventions(model: torch.nn.Module, rows: Sequence[Row]) -> Iterator[None]:
    """Each intervention among `rows` hooked on lm_head for its own rows, for one forward pass."""
    groups: dict[int, tuple[Intervention, torch.Tensor]] = {}
    for i, row in enumerate(rows):
        if row.request.intervention is not None:
            key = id(row.request.intervention)
            groups.setdefault(key, (row.request.intervention, torch.zeros(len(rows), dtype=torch.bool)))[1][i] = True
    with ExitStack() as hooks:
        for intervention, mask in groups.values():
            hooks.enter_context(intervention.applied(model, rows=mask))
        yield


@dataclass(frozen=True)
class _Packing:
    """Whole prompts packed into one sequence (1, T): lengths (rows,), starts (rows,) each prompt's first
    position, positions (T,) each token's within its prompt, mask (T, T) block-diagonal causal,
    last (rows,) each prompt's last position."""

    lengths: torch.Tensor
    starts: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    @staticmethod
    def of(group: Sequence[Row]) -> _Packing:
        lengths = torch.tensor([len(row.prompt) for row in group], dtype=torch.long)
        total = int(lengths.sum())
        segment = torch.repeat_interleave(torch.arange(len(group)), lengths)  # (T,) each token's row
        starts = lengths.cumsum(0) - lengths
        mask = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
        return _Packing(lengths, starts, torch.arange(total) - starts[segment], mask, starts + lengths - 1)

    def block(self, group: list[Row], packed: KV, device: torch.device) -> _Block:
        """The prompts' block from the packed keys and values (1, kv, T, hd per layer): each row's left-padded
        with zeros to the longest, by one gather (index (rows, width) into the packed positions, padding
        pointing at an appended zero column)."""
        total, width = self.total, int(self.lengths.max())
        offsets = torch.arange(width) - (width - self.lengths)[:, None]  # (rows, width): < 0 on the padding
        index = torch.where(offsets >= 0, self.starts[:, None] + offsets, total).reshape(-1).to(device)
        layers = [(_unpack(k, index, len(group)), _unpack(v, index, len(group))) for k, v in packed]
        return _Block(group, _fill(DynamicCache(), layers), (offsets >= 0).long().to(device))


@dataclass(frozen=True)
class _Prefilled:
    """A prompt as its prefill left it: keys and values per layer, (1, kv_heads, L, head_dim) each, never
    written in place, and the input of lm_head at its last position (d,), before any intervention."""

    layers: KV
    hidden: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.hidden.nbytes + sum(keys.nbytes + values.nbytes for keys, values in self.layers)


class PromptCache:
    """Prefilled prompts by owner (an API key's name, or None) and token ids, the least recently used going
    first once `max_bytes` is reached.

    A prompt seen again (a template, a retry, an evaluation's fixed prompts) skips its prefill: its cache rows
    are reused and its first token is chosen from the kept lm_head input, under the request's own intervention
    (the keys, values and that input do not depend on it: an intervention acts on lm_head's input only).
    Owners are kept apart: a faster answer must not tell one key which prompts another key sent."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Prefilled] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, owner: str | None, prompt: Sequence[int]) -> _Prefilled | None:
        key = (owner, tuple(prompt))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, owner: str | None, prompt: Sequence[int], layers: KV, hidden: torch.Tensor) -> None:
        """Keep a copy of one prompt's keys and values (1, kv, L, hd per layer) and its last lm_head input (d,)."""
        key = (owner, tuple(prompt))
        if key in self._entries:
            return
        entry = _Prefilled([(keys.clone(), values.clone()) for keys, values in layers], hidden.clone())
        if entry.nbytes > self.max_bytes:
            return
        while self.bytes + entry.nbytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1].nbytes
        self._entries[key] = entry
        self.bytes += entry.nbytes


@contextlib.contextmanager
def _head_inputs(head: torch.nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """While inside: each input of `head` (rows, 1, d) goes into `into` as (rows, d). Registered after
    `_rows_first` and before the interventions' hooks, so it sees rows, unedited."""
    handle = head.register_forward_pre_hook(lambda _m, args: into.append(args[0][:, -1].detach()))
    try:
        yield
    finally:
        handle.remove()


class Decoder:
    """The running batch of the served model (used from one thread at a time).

    `add` queues a row; `step` prefills what the token budget allows, decodes one token for every
    running row and returns the rows that ended; `drop` ends rows early; `clear` lets every row go.
    """

    def __init__(self, lm: LoadedModel, *, prefill_tokens: int | None = None, compact: bool = True,
                 prompt_cache_bytes: int = 0) -> None:
        self.lm = lm
        self.prefill_tokens = prefill_tokens  # prompt positions computed per step; None: no limit
        # Whether ended rows leave the batch (their compute freed) or ride along to its end, keeping the batch's
        # shape: the arithmetic, and so every logprob to the last bit, then stays that of one fixed batch.
        self.compact = compact
        self._stop = stop_token_ids(lm)
        self._cache_arg = _cache_argument(lm.model)
        # Whole prompts go in packed (one sequence, a block-diagonal mask) where attention takes a 4D mask.
        self._packs = getattr(lm.model.config, "_attn_implementation", None) in ("sdpa", "eager")
        # A step's decode and prefill share one forward pass where the attention layers are Llama's (tested).
        self._splits = self._packs and getattr(lm.model.config, "model_type", None) in SPLIT_MODEL_TYPES
        # Prompts seen before skip their prefill, where logits are lm_head(last hidden state) (Llama's).
        self.prompt_cache = PromptCache(prompt_cache_bytes) if self._splits and prompt_cache_bytes > 0 else None
        self._device = lm.model.device
        self._waiting: deque[Row] = deque()
        self._partial: _Block | None = None  # one long prompt part-way through its prefill, alone
        self._batch: _Block | None = None  # the running rows of ordinary prompts, one cache
        # Rows whose prompt needed chunks, each with its own cache: merged into `_batch`, one such row would
        # left-pad every other row's cache to its length and make every decode step attend over it.
        self._long: list[_Block] = []
        # The rows live when the current step began: none is reported before the step returns, so if it fails,
        # `clear` must hand every one back, whether the step had taken it out of `_waiting` (not yet in a block)
        # or it had ended in the step (no longer live), or their callers would wait forever.
        self._stepping: list[Row] = []

    @property
    def rows(self) -> int:
        """Rows held: waiting for prefill, part-way through it, or decoding."""
        running = sum(not row.ended for block in self._running() for row in block.rows)
        return len(self._waiting) + (self._partial is not None) + running

    @property
    def idle(self) -> bool:
        return self.rows == 0

    def live_rows(self) -> list[Row]:
        running = [row for block in self._running() for row in block.rows if not row.ended]
        partial = self._partial.rows if self._partial else []
        return list(dict.fromkeys([*self._waiting, *partial, *running]))  # in order, once each

    def _running(self) -> list[_Block]:
        return [*([self._batch] if self._batch is not None else []), *self._long]

    def add(self, request: GenerationRequest, ticket: _Ticket | None = None, index: int = 0,
            wave: _Wave | None = None) -> Row:
        """Queue one request for prefill; its row (the output comes with it once it has ended)."""
        ids = list(self.lm.tokenizer(request.prompt)["input_ids"]) or [int(self.lm.tokenizer.eos_token_id)]
        row = Row(request, ids, torch.Generator().manual_seed(request.seed), ticket, index, wave)
        if request.max_new_tokens <= 0:
            row.ended = True
        self._waiting.append(row)
        return row

    def drop(self, unwanted: Callable[[Row], bool]) -> list[Row]:
        """End the rows that `unwanted` names (their cache rows go at the next step); those rows."""
        dropped = [row for row in self.live_rows() if unwanted(row)]
        for row in dropped:
            row.ended, row.finish = True, "stop"
        self._waiting = deque(row for row in self._waiting if not row.ended)
        if self._partial is not None and self._partial.rows[0].ended:
            self._partial = None
        return dropped

    def clear(self) -> list[Row]:
        """Let every row go (after a failed step: the cache may be half-updated); those rows, with those that
        the failed step had taken in or ended (none of them was reported)."""
        rows = list(dict.fromkeys([*self._stepping, *self.live_rows()]))
        self._waiting.clear()
        self._partial = self._batch = None
        self._long, self._stepping = [], []
        return rows

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One scheduling step; the rows that ended in it, in no particular order."""
        self._stepping = self.live_rows()
        ended = [row for row in self._waiting if row.ended]  # a budget of 0
        self._waiting = deque(row for row in self._waiting if not row.ended)
        cached = self._from_cache()
        ended += [row for block in cached for row in block.rows if row.ended]
        group, chunk = self._prefill()
        batch = self._batch
        live = [row for row in batch.rows if not row.ended] if batch is not None else []
        if batch is not None and live and self._splits and (group or chunk):  # all in one forward pass
            fed = self._decode_and_feed(batch, group, chunk)
            ended += [row for row in (*live, *group) if row.ended]
            self._batch = _merge([batch, *fed, *cached], self.compact)
        else:
            if chunk:
                self._feed_partial(chunk)
            fed = [self._feed_group(group)] if group else []
            ended += [row for row in group if row.ended]
            self._batch = _merge([block for block in (batch, *fed, *cached) if block is not None], self.compact)
            if self._batch is not None:
                ended += self._decode(self._batch)
        chunked = self._chunk_done()
        ended += [row for block in chunked for row in block.rows if row.ended]
        self._long = [merged for block in (*self._long, *chunked)
                      if (merged := _merge([block], self.compact)) is not None]
        for block in self._long:
            ended += self._decode(block)
        self._stepping = []
        return ended

    def _forward(self, rows: Sequence[Row], input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache | None, last: torch.Tensor | None = None,
                 split: _SplitStep | None = None, hidden: list[torch.Tensor] | None = None) -> DynamicCache:
        """One forward pass; each row takes the token chosen from its last logits. The updated cache.
        last: for one packed sequence (1, T), each row's last position (rows,). split: its layout when it
        packs decode tokens and prompts (`_decode_and_feed`). hidden: receives lm_head's input (rows, d)."""
        with ExitStack() as hooks:
            if last is not None:  # lm_head sees (1, rows, d): give it (rows, 1, d), as the row masks expect
                hooks.enter_context(_rows_first(output_layer(self.lm.model)))
            if hidden is not None:
                hooks.enter_context(_head_inputs(output_layer(self.lm.model), hidden))
            hooks.enter_context(_interventions(self.lm.model, rows))
            extra = {}
            if split is not None:
                hooks.enter_context(_split_attention(self.lm.model))
                extra["eigenshift_split"] = split
            out = self.lm.model(input_ids=input_ids.to(self._device), attention_mask=mask,
                                position_ids=positions.to(self._device), use_cache=True,
                                logits_to_keep=1 if last is None else last.to(self._device),
                                **{self._cache_arg: cache}, **extra)
        self._choose(rows, out.logits[:, -1])
        return getattr(out, self._cache_arg)  # type: ignore[no-any-return]

    def _choose(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        """Each row takes the token its sampling chooses from its logits (rows, vocab)."""
        logits = logits.to("cpu", torch.float32)
        sampled = sample_next_tokens(logits, [r.request.temperature for r in rows], [r.request.top_p for r in rows],
                                     [r.generator for r in rows])
        chosen = torch.tensor(sampled)[:, None]
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen)[:, 0].tolist()  # (rows,)
        for row, token, logprob in zip(rows, sampled, logprobs, strict=True):
            if not row.ended:  # one riding along (not `compact`) keeps what it had
                row.accept(token, logprob, self._stop)

    def _from_cache(self) -> list[_Block]:
        """The waiting rows whose prompt is in the prompt cache, each as a block of its own with its first
        token chosen (lm_head on the kept input, under the row's intervention); they cost no prefill, so they
        go ahead of rows still waiting for the budget."""
        if self.prompt_cache is None or not self._waiting:
            return []
        rows: list[Row] = []
        entries: list[_Prefilled] = []
        waiting: deque[Row] = deque()
        for row in self._waiting:
            entry = self.prompt_cache.get(row.owner, row.prompt)
            if entry is None:
                waiting.append(row)
            else:
                rows.append(row)
                entries.append(entry)
        if not rows:
            return []
        self._waiting = waiting
        hidden = torch.stack([entry.hidden for entry in entries])[:, None]  # (rows, 1, d)
        with _interventions(self.lm.model, rows):
            logits = output_layer(self.lm.model)(hidden)  # (rows, 1, vocab)
        self._choose(rows, logits[:, -1])
        blocks = []
        for row, entry in zip(rows, entries, strict=True):
            row.fed, row.prompt = len(row.prompt), []
            mask = torch.ones(1, row.fed, dtype=torch.long, device=self._device)
            blocks.append(_Block([row], _fill(DynamicCache(), list(entry.layers)), mask))
        return blocks

    def _remember(self, group: Sequence[Row], packing: _Packing, packed: KV, hidden: torch.Tensor) -> None:
        """Keep each prompt of `group` (still unfed) from one packed pass: its keys and values out of
        `packed` (1, kv, T, hd per layer), its lm_head input from `hidden` (rows, d) in group order."""
        assert self.prompt_cache is not None
        for i, row in enumerate(group):
            start, end = int(packing.starts[i]), int(packing.starts[i] + packing.lengths[i])
            self.prompt_cache.put(row.owner, row.prompt, [(k[:, :, start:end], v[:, :, start:end]) for k, v in packed], hidden[i])

    def _prefill(self) -> tuple[list[Row], int]:
        """Choose prompts within the step's budget: whole prompts first, in arrival order, for one forward pass
        (their requests wait on them and they are cheap), then the long prompt part-way through its chunks,
        which keeps 1/LONG_CHUNK_DIVISOR of the budget and gets no more while other rows decode: it progresses
        every step without holding back the prompts behind it or slowing the running rows more than about
        twofold. (The whole prompts, the long prompt's tokens to feed this step; `step` feeds them.)"""
        budget = self.prefill_tokens if self.prefill_tokens is not None else math.inf
        reserve = math.ceil(budget / LONG_CHUNK_DIVISOR) if self.prefill_tokens is not None else math.inf
        room = budget - reserve if self._partial is not None else budget
        group: list[Row] = []
        while self._waiting and self._group_tokens([*group, self._waiting[0]]) <= room:
            group.append(self._waiting.popleft())
        budget -= self._group_tokens(group)
        if self._partial is None and not group and self._waiting and budget > 0:  # too long for one step: chunks
            row = self._waiting.popleft()
            self._partial = _Block([row], None, torch.ones(1, 0, dtype=torch.long, device=self._device))
        if self._partial is None or budget <= 0:
            return group, 0
        if self._running():  # a chunk then costs about what their decode step does (CPU, SmolLM2)
            budget = min(budget, reserve)
        return group, int(min(budget, len(self._partial.rows[0].prompt)))

    def _chunk_done(self) -> list[_Block]:
        """The long prompt's block once its last chunk is in (its first token chosen), which then decodes in a
        block of its own; else nothing."""
        if self._partial is None or self._partial.rows[0].prompt:
            return []
        done, self._partial = self._partial, None
        return [done]

    def _group_tokens(self, group: Sequence[Row]) -> int:
        """Positions a forward pass over these whole prompts computes: packed, their sum; padded, rows × the longest."""
        lengths = [len(row.prompt) for row in group]
        return sum(lengths) if self._packs else len(lengths) * max(lengths, default=0)

    def _feed_partial(self, chunk: int) -> int:
        """The next `chunk` prompt tokens of the long prompt; the token it chooses is kept only after the last."""
        assert self._partial is not None
        row = self._partial.rows[0]
        ids, row.prompt = row.prompt[:chunk], row.prompt[chunk:]
        mask = torch.ones(1, row.fed + chunk, dtype=torch.long, device=self._device)
        positions = torch.arange(row.fed, row.fed + chunk)[None]
        if row.prompt:  # not the last chunk: no token is chosen yet
            out = self.lm.model(input_ids=torch.tensor([ids], device=self._device), attention_mask=mask,
                                position_ids=positions.to(self._device), use_cache=True, logits_to_keep=1,
                                **{self._cache_arg: self._partial.cache})
            cache = getattr(out, self._cache_arg)
        else:
            cache = self._forward([row], torch.tensor([ids]), mask, positions, self._partial.cache)
        row.fed += chunk
        self._partial = _Block([row], cache, mask)
        return chunk

    def _feed_group(self, group: list[Row]) -> _Block:
        """Whole prompts in one forward pass; their block, its cache left-padded to the longest prompt."""
        block = self._feed_packed(group) if self._packs else self._feed_padded(group)
        for row in group:
            row.fed, row.prompt = len(row.prompt), []
        return block

    def _feed_packed(self, group: list[Row]) -> _Block:
        # One sequence (1, T) of all the prompts, each attending only to its own tokens (a block-diagonal
        # causal mask) at its own positions: T = the prompts' total length, where a padded batch computes
        # rows × the longest (1.6–1.8× more for 8–32 RealToxicityPrompts prompts).
        packing = _Packing.of(group)
        input_ids = torch.tensor([[token for row in group for token in row.prompt]])
        hidden: list[torch.Tensor] = []
        packed = _tensors(self._forward(group, input_ids, packing.mask[None, None].to(self._device),
                                        packing.positions[None], None, last=packing.last,
                                        hidden=hidden if self.prompt_cache is not None else None))
        if self.prompt_cache is not None:
            self._remember(group, packing, packed, hidden[0])
        return packing.block(group, packed, self._device)

    def _decode_and_feed(self, batch: _Block, group: list[Row], chunk: int) -> list[_Block]:
        """The next token of every row of `batch`, the first of every prompt of `group` and the long prompt's
        next `chunk` tokens (its first token after its last chunk) from one forward pass over one packed sequence
        (1, rows + T + chunk), in that order: a step reads the weights once, where a pass each would read them up to
        three times (on a CPU, 32 decoding rows and 60 prompt tokens take ~150 ms so, ~260 ms apart).
        Attention keeps them apart (`_split_attention_forward`). Updates `batch` (riding rows, ended or not, as
        `_decode` does) and the long prompt's block; the prompts' block, its cache left-padded, if any."""
        rows, packing = batch.rows, _Packing.of(group)
        pad = int(self.lm.tokenizer.pad_token_id)
        tokens = [row.tokens[-1] if row.tokens else pad for row in rows] + [t for row in group for t in row.prompt]
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=self._device)], dim=1)
        positions = [torch.tensor([row.fed for row in rows]), packing.positions]
        last = [torch.arange(len(rows)), len(rows) + packing.last]  # positions whose logits choose a token
        chosen = [*rows, *group]
        long = self._partial.rows[0] if chunk and self._partial is not None else None
        chunk_mask = None
        if long is not None:
            tokens += long.prompt[:chunk]
            positions.append(torch.arange(long.fed, long.fed + chunk))
            # (1, 1, chunk, fed + chunk): each chunk token sees the long prompt's cache and the chunk before it
            chunk_mask = torch.ones(chunk, long.fed + chunk, dtype=torch.bool).tril(long.fed)[None, None].to(self._device)
            if len(long.prompt) == chunk:  # the last chunk: its last position chooses the row's first token
                last.append(torch.tensor([len(tokens) - 1]))
                chosen.append(long)
        cache = _SplitCache(_tensors(batch.cache), len(rows), packing.total,
                            self._partial.cache if long is not None and self._partial is not None else None)
        step = _SplitStep(len(rows), mask.bool()[:, None, None, :], packing.mask[None, None].to(self._device),
                          chunk_mask, cache)
        hidden: list[torch.Tensor] = []
        self._forward(chosen, torch.tensor([tokens]), step.decode_mask, torch.cat(positions)[None], cache,
                      last=torch.cat(last), split=step, hidden=hidden if self.prompt_cache is not None else None)
        layers = range(len(cache.layers))
        batch.cache, batch.mask = _fill(DynamicCache(), [cache.decoded[layer] for layer in layers]), mask
        for row in rows:
            row.fed += 1
        if long is not None and self._partial is not None:
            long.prompt = long.prompt[chunk:]
            long.fed += chunk
            self._partial = _Block([long], cache.chunk, torch.ones(1, long.fed, dtype=torch.long, device=self._device))
        if not group:
            return []
        prompts = [cache.prompts[layer] for layer in layers]
        if self.prompt_cache is not None:
            self._remember(group, packing, prompts, hidden[0][len(rows) : len(rows) + len(group)])
        block = packing.block(group, prompts, self._device)
        for row in group:
            row.fed, row.prompt = len(row.prompt), []
        return [block]

    def _feed_padded(self, group: list[Row]) -> _Block:
        """Whole prompts as one left-padded batch (padding masked, positions counted over real tokens)."""
        width = max(len(row.prompt) for row in group)
        pad = int(self.lm.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in group])  # (rows, width)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group], device=self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._forward(group, input_ids, mask, positions, None)
        return _Block(group, cache, mask)

    def _decode(self, batch: _Block) -> list[Row]:
        """One token for every running row; the rows that ended."""
        rows = batch.rows
        pad = int(self.lm.tokenizer.pad_token_id)
        input_ids = torch.tensor([[row.tokens[-1] if row.tokens else pad] for row in rows])  # (rows, 1): last chosen
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=self._device)], dim=1)
        positions = torch.tensor([[row.fed] for row in rows])
        live = [row for row in rows if not row.ended]
        batch.cache = self._forward(rows, input_ids, mask, positions, batch.cache)
        batch.mask = mask
        for row in rows:
            row.fed += 1
        return [row for row in live if row.ended]


def decode_batch(lm: LoadedModel, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
    """Continue every request, all prefilled together and decoded to the end; rows stop independently."""
    decoder = Decoder(lm, compact=False)
    rows = [decoder.add(request) for request in requests]
    while not decoder.idle:
        decoder.step()
    return [row.output(lm.tokenizer) for row in rows]


# The scheduler in front of the decoder.

class Busy(Exception):
    """The generation queue is full: answered 503 with Retry-After at once, never queued."""


@dataclass(eq=False)
class _Ticket:
    """One `Batcher.generate` call: its rows' outputs, handed to `future` on the event loop once all have ended."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[GenerationOutput]]
    key: str
    outputs: list[GenerationOutput | None]
    left: int
    cancelled: bool = False  # set on the event loop when the caller stopped waiting, read on the model thread


@dataclass(eq=False)
class _Wave:
    """Rows admitted in one step; their outputs go to `on_batch` once all have ended."""

    left: int
    outputs: list[GenerationOutput] = field(default_factory=list)


def _settle(future: asyncio.Future[list[GenerationOutput]], result: list[GenerationOutput] | BaseException) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def fair_pick(keys: Sequence[str], held: Counter[str], room: int, share: int) -> list[int]:
    """Which waiting rows (their keys, oldest first) to admit into `room` free rows: first come first served
    among the keys holding fewer than `share` rows (`held` counts the running ones), then, if room is left,
    the rest in order (no other key is waiting for it)."""
    counts = Counter(held)
    picked: list[int] = []
    for i, key in enumerate(keys):
        if len(picked) == room:
            return picked
        if counts[key] < share:
            counts[key] += 1
            picked.append(i)
    chosen = set(picked)
    return sorted(picked + [i for i in range(len(keys)) if i not in chosen][:room - len(picked)])


class Batcher:
    """Continuous batching: before every decode step the model thread admits waiting rows (up to `max_size`
    in the batch, each key at most `key_share` of it while another key waits) and lets finished rows go.
    When the batch was empty, the first request waits `window_s` for company."""

    def __init__(self, decoder: Decoder, *, max_size: int, window_s: float,
                 on_batch: Callable[[list[GenerationOutput]], None] | None = None,
                 max_waiting: int | None = None, key_share: float = 1.0) -> None:
        self.decoder = decoder
        self.max_waiting = max_waiting
        self.waiting = 0  # rows queued or in the running batch
        self.max_size = max_size
        self.window_s = window_s
        self.key_share = key_share
        self.on_batch = on_batch
        self._queue: deque[tuple[GenerationRequest, _Ticket, int]] = deque()  # not yet admitted, oldest first
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="eigenshift-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)

    def check_room(self, rows: int) -> None:
        """Raise Busy when `rows` more would overfill the queue (a stream asks before its response starts)."""
        if self.max_waiting is not None and self.waiting + rows > self.max_waiting:
            raise Busy(f"the generation queue is full ({self.waiting} of max_generate_queue={self.max_waiting} rows)")

    async def generate(self, requests: Sequence[GenerationRequest], key: str = "") -> list[GenerationOutput]:
        """Queue the requests of one caller (`key`: its API key's name) and wait for all of them; they join
        the running batch as room frees up, each on its own."""
        assert self._thread is not None, "Batcher.start() was not awaited"
        self.check_room(len(requests))
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        ticket = _Ticket(loop, loop.create_future(), key, [None] * len(requests), len(requests))
        self.waiting += len(requests)
        try:
            with self._wake:
                self._queue.extend((request, ticket, i) for i, request in enumerate(requests))
                self._wake.notify()
            return await ticket.future
        finally:  # also when the caller went away: its rows end before the next step
            self.waiting -= len(requests)
            ticket.cancelled = True

    # On the model thread.

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._queue and self.decoder.idle:
                    self._wake.wait()
                if self._stopping:
                    break
                was_idle = self.decoder.idle
            if was_idle and self.window_s > 0:
                time.sleep(self.window_s)  # company for the first request
            try:
                self._admit()
                ended = self.decoder.drop(lambda row: row.ticket is not None and row.ticket.cancelled)
                ended += self.decoder.step()
                for row in ended:
                    self._finish(row)
            except Exception as error:  # the batch's cache is lost: every row in it fails
                self._fail([row.ticket for row in self.decoder.clear() if row.ticket], error)
            time.sleep(0)  # the event loop may take the GIL between steps
        with self._wake:  # stopped: nobody will run what is left
            waiting = [ticket for _, ticket, _ in self._queue]
            self._queue.clear()
        self._fail([row.ticket for row in self.decoder.clear() if row.ticket] + waiting,
                   Busy("the server is shutting down"))

    def _fail(self, tickets: list[_Ticket], error: Exception) -> None:
        for ticket in {id(ticket): ticket for ticket in tickets}.values():
            ticket.cancelled = True  # its rows still waiting go too
            self._hand(ticket, error)

    def _admit(self) -> None:
        """Move waiting rows into the decoder as room allows, fairly between keys."""
        with self._wake:
            queued = [entry for entry in self._queue if not entry[1].cancelled]
            room = self.max_size - self.decoder.rows
            if room <= 0 or not queued:
                self._queue = deque(queued)
                return
            held = Counter(row.ticket.key for row in self.decoder.live_rows() if row.ticket)
            share = max(1, math.ceil(self.key_share * self.max_size))
            picked = fair_pick([ticket.key for _, ticket, _ in queued], held, room, share)
            chosen = set(picked)
            self._queue = deque(entry for i, entry in enumerate(queued) if i not in chosen)
        wave = _Wave(len(picked))
        for i in picked:
            request, ticket, index = queued[i]
            self.decoder.add(request, ticket, index, wave)  # tokenizes: outside the lock

    def _finish(self, row: Row) -> None:
        output = row.output(self.decoder.lm.tokenizer)
        if row.wave is not None:
            row.wave.outputs.append(output)
            row.wave.left -= 1
            if row.wave.left == 0 and self.on_batch is not None:
                self.on_batch(row.wave.outputs)
        ticket = row.ticket
        if ticket is None:
            return
        ticket.outputs[row.index] = output
        ticket.left -= 1
        if ticket.left == 0:
            self._hand(ticket, [o for o in ticket.outputs if o is not None])

    @staticmethod
    def _hand(ticket: _Ticket, result: list[GenerationOutput] | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
            ticket.loop.call_soon_threadsafe(_settle, ticket.future, result)


def context_length(lm: LoadedModel) -> int | None:
    """The positions the model can attend to, from its config; None when the config names none."""
    config = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelServer:
    """The one model of this process, its interventions (loaded once each) and the batcher in front of it."""

    def __init__(self, lm: LoadedModel, resolve: Callable[[str], Intervention], *, max_size: int, window_s: float,
                 on_batch: Callable[[list[GenerationOutput]], None] | None = None,
                 max_waiting: int | None = None, prefill_tokens: int | None = None, key_share: float = 1.0,
                 prompt_cache_bytes: int = 0) -> None:
        self.lm = lm
        self._resolve = resolve
        self._interventions: dict[str, Intervention] = {}
        # Requests that name a new intervention at once load and check it once; others are not held up.
        self._loading: dict[str, threading.Lock] = {}
        self._hashing = threading.Lock()
        self._head_sha256: str | None = None  # the served lm_head's, computed once
        decoder = Decoder(lm, prefill_tokens=prefill_tokens, prompt_cache_bytes=prompt_cache_bytes)
        self.batcher = Batcher(decoder, max_size=max_size, window_s=window_s,
                               on_batch=on_batch, max_waiting=max_waiting, key_share=key_share)

    def prompt_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Each prompt's length in tokens, as `decode_batch` encodes it."""
        return [len(self.lm.tokenizer(prompt)["input_ids"]) for prompt in prompts]

    def prompt_token_limit(self, max_new_tokens: int, max_prompt_tokens: int) -> int:
        """The longest prompt allowed: `max_prompt_tokens`, and room left in the context for the new tokens."""
        context = context_length(self.lm)
        return max_prompt_tokens if context is None else min(max_prompt_tokens, context - max_new_tokens)

    def intervention(self, intervention_id: str) -> Intervention:
        """The intervention with this id, checked against the served lm_head once and kept."""
        kept = self._interventions.get(intervention_id)
        if kept is not None:
            return kept
        with self._loading.setdefault(intervention_id, threading.Lock()):  # dict.setdefault is atomic
            if intervention_id not in self._interventions:
                intervention = self._resolve(intervention_id)
                with self._hashing:
                    if self._head_sha256 is None:
                        self._head_sha256 = lm_head_sha256(self.lm.model)
                intervention.check_model(self.lm.model, self._head_sha256)
                self._interventions[intervention_id] = intervention
            return self._interventions[intervention_id]

"""Text from the served model, many requests per forward pass, each with its own detox setting.

`decode_batch` runs one left-padded batch through a KV-cached sampling loop. Every row has its own
seed, temperature, top-p and token budget, and its own intervention (or none): each intervention in
the batch is one lm_head pre-hook whose row mask selects its rows, so detox on and off share a batch,
the weights are never copied and no second head exists. `Batcher` gathers the requests that arrive
within a short window into one such batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from app.sampling import sample_next_tokens
from eigenshift_core.generation import stop_token_ids
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel


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


@torch.inference_mode()
def decode_batch(lm: LoadedModel, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
    """Continue every request in one batch; rows stop independently."""
    tokenizer, model, n = lm.tokenizer, lm.model, len(requests)
    encoded = [tokenizer(r.prompt)["input_ids"] for r in requests]
    batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
    input_ids = batch["input_ids"].to(model.device)  # (n, L), left-padded
    mask = batch["attention_mask"].to(model.device)  # (n, L)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padding changes nothing
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    temperatures, top_ps = [r.temperature for r in requests], [r.top_p for r in requests]
    stop = stop_token_ids(lm)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    finish = ["length"] * n
    active = [True] * n
    groups: dict[int, tuple[Intervention, torch.Tensor]] = {}
    for row, request in enumerate(requests):
        if request.intervention is not None:
            key = id(request.intervention)
            groups.setdefault(key, (request.intervention, torch.zeros(n, dtype=torch.bool)))[1][row] = True
    with ExitStack() as hooks:
        for intervention, rows in groups.values():
            hooks.enter_context(intervention.applied(model, rows=rows))
        past = None
        cache_arg = _cache_argument(model)
        for _ in range(max(r.max_new_tokens for r in requests)):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_arg: past})
            past = getattr(out, cache_arg)
            logits = out.logits[:, -1].to("cpu", torch.float32)  # (n, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            sampled = sample_next_tokens(logits, temperatures, top_ps, generators)  # all rows at once
            chosen = []
            for row, request in enumerate(requests):
                token = sampled[row] if active[row] else int(tokenizer.pad_token_id)
                chosen.append(token)
                if not active[row]:
                    continue
                if token in stop:
                    active[row], finish[row] = False, "stop"
                    continue
                tokens[row].append(token)
                logprobs[row].append(float(logp[row, token]))
                if request.on_token is not None and not request.on_token(token):
                    active[row], finish[row] = False, "stop"
                elif len(tokens[row]) >= request.max_new_tokens:
                    active[row] = False
            if not any(active):
                break
            input_ids = torch.tensor(chosen, device=model.device)[:, None]  # (n, 1)
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            positions = positions[:, -1:] + 1
    return [GenerationOutput(str(tokenizer.decode(t, skip_special_tokens=True)), t, lp, f)
            for t, lp, f in zip(tokens, logprobs, finish, strict=True)]


class Busy(Exception):
    """The generation queue is full: answered 503 with Retry-After at once, never queued."""


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future[GenerationOutput]


class Batcher:
    """Dynamic batching: the first waiting request opens a window of `window_s`; whatever arrives in
    it (up to `max_size` rows) runs as one batch on the single model thread."""

    def __init__(self, run: Callable[[list[GenerationRequest]], list[GenerationOutput]], *, max_size: int,
                 window_s: float, on_batch: Callable[[list[GenerationOutput]], None] | None = None,
                 max_waiting: int | None = None) -> None:
        self.run = run
        self.max_waiting = max_waiting
        self.waiting = 0  # rows queued or in the running batch
        self.max_size = max_size
        self.window_s = window_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eigenshift-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_room(self, rows: int) -> None:
        """Raise Busy when `rows` more would overfill the queue (a stream asks before its response starts)."""
        if self.max_waiting is not None and self.waiting + rows > self.max_waiting:
            raise Busy(f"the generation queue is full ({self.waiting} of max_generate_queue={self.max_waiting} rows)")

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Queue the requests (they may land in different batches) and wait for all of them."""
        assert self._queue is not None, "Batcher.start() was not awaited"
        self.check_room(len(requests))
        loop = asyncio.get_running_loop()
        pending = [_Pending(r, loop.create_future()) for r in requests]
        self.waiting += len(pending)
        try:
            for item in pending:
                self._queue.put_nowait(item)
            return list(await asyncio.gather(*(item.future for item in pending)))
        finally:  # also when the client went away: its futures are cancelled and the batch loop skips them
            self.waiting -= len(pending)
            for item in pending:
                item.future.cancel()

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(items) < self.max_size:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [item for item in items if not item.future.done()]  # a client that gave up
            if not live:
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.run, [i.request for i in live])
            except Exception as error:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            for item, output in zip(live, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(output)
            if self.on_batch is not None:
                self.on_batch(outputs)


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
                 max_waiting: int | None = None) -> None:
        self.lm = lm
        self._resolve = resolve
        self._interventions: dict[str, Intervention] = {}
        self.batcher = Batcher(lambda requests: decode_batch(lm, requests), max_size=max_size, window_s=window_s,
                               on_batch=on_batch, max_waiting=max_waiting)

    def prompt_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Each prompt's length in tokens, as `decode_batch` encodes it."""
        return [len(self.lm.tokenizer(prompt)["input_ids"]) for prompt in prompts]

    def prompt_token_limit(self, max_new_tokens: int, max_prompt_tokens: int) -> int:
        """The longest prompt allowed: `max_prompt_tokens`, and room left in the context for the new tokens."""
        context = context_length(self.lm)
        return max_prompt_tokens if context is None else min(max_prompt_tokens, context - max_new_tokens)

    def intervention(self, intervention_id: str) -> Intervention:
        """The intervention with this id, checked against the served lm_head once and kept."""
        if intervention_id not in self._interventions:
            intervention = self._resolve(intervention_id)
            intervention.check_model(self.lm.model)
            self._interventions[intervention_id] = intervention
        return self._interventions[intervention_id]

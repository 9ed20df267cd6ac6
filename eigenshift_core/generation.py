"""Step 1, generate: batched continuations of prompts, capturing the lm_head input behind every token.

Two ways to get states:
- `generate_continuations`: the model writes (greedy or sampled); a pre-hook on the output layer keeps
  the last position of each lm_head call, which is the state that chose the next token, whether the
  model projects the whole sequence or only the last position (transformers versions differ there).
- `capture_continuation_states`: given (prompt, continuation) texts, one batched forward pass of the
  model body (no vocabulary projection) yields the state before every continuation token.
Both sort rows by length before batching, so padding stays small, and restore the input order.

Shared prefixes: the samples of one prompt share its prefill. Inside a batch, the model's first forward
(generate's prefill) runs once per distinct prompt, and its logits and KV cache are gathered back to every
row before decoding starts; `model.generate` does all the rest (logits processors, sampling, stopping), so
the random draws, the tokens and the states equal those of prefilling every row.

On a CPU, batches run side by side, one per torch thread: hooks are registered once per run and keep
per-thread state, and each batch's sampler draws from a generator of its own, seeded as torch's global one
would be, so a batch's tokens never depend on which batches ran beside it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from eigenshift_core.errors import InputError
from eigenshift_core.files import atomic_write
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, Tokenizer, output_layer
from eigenshift_core.sampling import ReplayedMultinomial, SortFreeTopP

Span = tuple[int, int]
_BatchResult = tuple[list[int], torch.Tensor, torch.Tensor]  # rows, new token ids (b, steps), states (b, steps, d)
Progress = Callable[[int, int], None]  # (rows done, total rows), called after every batch


@dataclass(frozen=True)
class Continuations:
    """n continuations with their tokens and the states that produced them.

    prompt_index (n,) which prompt each row continues; texts: the continuation texts;
    token_ids (n, T) long, padded with -1 past `lengths` (n,); states (n, T, d) float32, zeros past length;
    spans: per row, the (start, end) characters of each token in its text.
    """

    prompts: list[str]
    prompt_index: torch.Tensor
    texts: list[str]
    token_ids: torch.Tensor
    lengths: torch.Tensor
    states: torch.Tensor
    spans: list[list[Span]]

    def __len__(self) -> int:
        return len(self.texts)

    def row_states(self, row: int) -> torch.Tensor:
        """(length, d) states of one row."""
        return self.states[row, : int(self.lengths[row])]

    def row_tokens(self, row: int) -> torch.Tensor:
        return self.token_ids[row, : int(self.lengths[row])]

    def save(self, directory: Path) -> Path:
        """`continuations.safetensors` (tensors) and `continuations.jsonl` (prompt, text, spans per row)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"prompt_index": self.prompt_index, "token_ids": self.token_ids, "lengths": self.lengths,
                   "states": self.states}
        lines = [
            json.dumps({"row": r, "prompt_index": int(self.prompt_index[r]),
                        "prompt": self.prompts[int(self.prompt_index[r])], "text": self.texts[r], "spans": self.spans[r]})
            for r in range(len(self))
        ]
        atomic_write(directory / "continuations.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
        atomic_write(directory / "continuations.jsonl", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        return directory

    @staticmethod
    def load(directory: Path) -> Continuations:
        directory = Path(directory)
        if not (directory / "continuations.safetensors").is_file() or not (directory / "continuations.jsonl").is_file():
            raise InputError(f"no generate output in {directory} (run `eigenshift generate` first)", field="generations")
        try:
            t = load_file(str(directory / "continuations.safetensors"))
            rows = [json.loads(line) for line in (directory / "continuations.jsonl").read_text().splitlines() if line]
        except (OSError, ValueError, SafetensorError) as error:
            raise InputError(f"corrupt generate output in {directory}: {error}", field="generations") from None
        prompts: dict[int, str] = {}
        for row in rows:
            prompts.setdefault(row["prompt_index"], row["prompt"])
        return Continuations(
            [prompts[i] for i in range(len(prompts))], t["prompt_index"], [r["text"] for r in rows], t["token_ids"],
            t["lengths"], t["states"], [[tuple(s) for s in r["spans"]] for r in rows],
        )


@contextmanager
def captured_head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the last-position lm_head input, (batch, d) float32 on CPU, of every forward that the calling
    thread runs inside the block."""
    running = _BatchInThread()
    with _capturing_head_inputs(model, running):
        yield running.captured


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Tokens that end a continuation: the generation config's EOS ids and the tokenizer's."""
    ids = lm.model.generation_config.eos_token_id
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        stop.add(int(lm.tokenizer.eos_token_id))
    return stop


def token_spans(tokenizer: Tokenizer, token_ids: Sequence[int]) -> tuple[str, list[Span]]:
    """Decode tokens and give each its character span in the decoded text (by incremental decoding)."""
    ids = list(token_ids)
    spans: list[Span] = []
    previous = 0
    for end in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:end], skip_special_tokens=True))
        spans.append((previous, max(previous, length)))
        previous = max(previous, length)
    return str(tokenizer.decode(ids, skip_special_tokens=True)), spans


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_prompts(prompts: Sequence[str]) -> None:
    if len(prompts) == 0:
        raise InputError("the prompt set is empty", field="prompts")


@torch.inference_mode()
def generate_continuations(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    intervention: Intervention | None = None,
    share_prefill: bool = True,
    fast_sampling: bool = True,
    workers: int | None = None,
    progress: bool = False,
    on_progress: Progress | None = None,
) -> Continuations:
    """Continue each prompt `samples` times and capture the state behind every generated token.

    Rows are prompt-major (prompt 0's samples first). Sampling is seeded per batch (seed + batch number),
    so the same seed and batch_size give the same samples, with or without an intervention.
    share_prefill: prefill each distinct prompt of a batch once (same tokens and states as False, which
    prefills every row). fast_sampling: nucleus filtering by `SortFreeTopP` and draws by `ReplayedMultinomial`
    (the same tokens as False, which uses transformers' warper with its argsort, and `torch.multinomial`).
    workers: batches generated at once, each in a thread with torch's threads divided among them; by
    default, on a CPU, one batch per torch thread (a batch of 32 rows uses one core better than two cores
    share one batch's small matmuls), else 1. A batch's tokens depend on its own thread count only, never
    on its neighbours. transformers' sampler (do_sample without fast_sampling), and sampling off the CPU, draw
    from torch's global generator, so they run one batch at a time.
    on_progress(rows done, total rows) is called after every batch, in batch order, from the calling thread.
    The paper's protocol is samples=25, max_new_tokens=20, do_sample=True, top_p=0.95, temperature=1.0.
    """
    _check_prompts(prompts)
    if samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InputError("samples, max_new_tokens and batch_size must be at least 1", field="samples")
    tokenizer, model = lm.tokenizer, lm.model
    # On a CPU a batch's fast sampler draws from a generator of its own; transformers' sampler, and any sampler
    # on another device, from the device's global generator, seeded per batch.
    own_draws = fast_sampling and model.device.type == "cpu"
    global_draws = do_sample and not own_draws
    if workers is not None and (workers < 1 or (workers > 1 and global_draws)):
        raise InputError("workers must be at least 1, and 1 where sampling draws from torch's global generator "
                         "(transformers' sampler, fast_sampling=False, or a model off the CPU)", field="workers")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise InputError("a prompt is empty after tokenization", field="prompts")
    row_prompt = [i for i in range(len(prompts)) for _ in range(samples)]
    stop = stop_token_ids(lm)
    n, d = len(row_prompt), output_layer(model).in_features  # type: ignore[arg-type]
    token_ids = torch.full((n, max_new_tokens), -1, dtype=torch.long)
    states = torch.zeros(n, max_new_tokens, d)
    lengths = torch.zeros(n, dtype=torch.long)
    batches = _length_sorted_batches([len(encoded[p]) for p in row_prompt], batch_size)
    if workers is None:
        workers = 1 if global_draws or model.device.type != "cpu" else min(torch.get_num_threads(), len(batches))
    running = _BatchInThread()

    def one_batch(number: int, rows: list[int], padded: dict[str, torch.Tensor]) -> _BatchResult:
        """(rows, new token ids (b, steps), the states that chose them (b, steps, d)) of one batch."""
        batch = {key: value.to(model.device) for key, value in padded.items()}
        groups = _prompt_groups([row_prompt[r] for r in rows]) if share_prefill else None
        running.captured, running.groups = [], groups
        # the stream that torch.manual_seed(seed + number) starts, as a generator of this batch (CPU only)
        draws = torch.Generator().manual_seed(seed + number) if own_draws else None
        if global_draws:
            torch.manual_seed(seed + number)
        with torch.inference_mode():  # a mode of the calling thread: each worker sets its own
            output = model.generate(  # type: ignore[operator]  # transformers types generate oddly
                **batch, max_new_tokens=max_new_tokens, min_new_tokens=1, top_k=None, pad_token_id=tokenizer.pad_token_id,
                **sampling_arguments(do_sample, top_p, temperature, fast_sampling, draws),
            )
        if running.groups is not None:
            raise RuntimeError("generate never ran the shared prefill")
        new = output[:, batch["input_ids"].shape[1] :].cpu()  # (b, steps)
        captured = running.captured
        if groups is not None:
            captured[0] = captured[0][groups[1]]  # the prefill ran on the distinct prompts only: (u, d) -> (b, d)
        return rows, new, torch.stack(captured[: new.shape[1]], dim=1)

    with ExitStack() as stack:
        stack.enter_context(_capturing_head_inputs(model, running))  # first: sees the unedited state
        if intervention is not None:
            stack.enter_context(intervention.applied(model))
        if share_prefill:
            stack.enter_context(_sharing_prefills(model, running))
        done = 0
        # Padded here, in the calling thread: the tokenizer is not shared with the workers.
        inputs = [(number, rows, dict(tokenizer.pad({"input_ids": [encoded[row_prompt[r]] for r in rows]},
                                                     return_tensors="pt")))
                  for number, rows in enumerate(batches)]
        # Closed on the way out, before the hooks go: a batch still running when the consumer stops (an error,
        # a cancel raised from on_progress) finishes under them, and none starts after.
        results = stack.enter_context(closing(_in_order(one_batch, inputs, workers)))
        for rows, new, steps in tqdm(results, total=len(batches), desc="generate", disable=not progress):
            for j, row in enumerate(rows):
                length = _length_before_stop(new[j].tolist(), stop)
                token_ids[row, :length] = new[j, :length]
                states[row, :length] = steps[j, :length]
                lengths[row] = length
            done += len(rows)
            if on_progress is not None:
                on_progress(done, n)
    texts, spans = zip(*(token_spans(tokenizer, token_ids[r, : lengths[r]].tolist()) for r in range(n)), strict=True)
    return Continuations(list(prompts), torch.tensor(row_prompt), list(texts), token_ids, lengths, states, list(spans))


T = TypeVar("T")


def _in_order(run: Callable[..., T], arguments: list[tuple[Any, ...]], workers: int) -> Generator[T, None, None]:
    """run(*a) for each a, yielded in order; with workers > 1, that many at once in threads, each with
    torch's threads divided among them. Once the consumer stops (an error, a cancel raised from progress),
    no further call starts, the running ones finish, and torch's thread count is restored."""
    if workers <= 1:
        yield from (run(*a) for a in arguments)
        return
    threads = torch.get_num_threads()
    # torch.set_num_threads in a worker sets that thread's own OpenMP and MKL counts, and the count later
    # threads start with, which is why it is put back at the end.
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(max(1, threads // workers),))
    try:
        futures = [pool.submit(run, *a) for a in arguments]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def sampling_arguments(do_sample: bool, top_p: float, temperature: float, fast_sampling: bool,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
    """`model.generate` keywords for greedy or nucleus sampling. Fast: temperature, `SortFreeTopP` and
    `ReplayedMultinomial` (drawing from `generator`, default: the default generator) go in as custom
    processors, in the order generate would apply its own (temperature, top-p, then its softmax and draw),
    and generate runs greedily: the replayed draw leaves one token finite."""
    if not do_sample:
        return {"do_sample": False, "top_p": None, "temperature": None}
    if not fast_sampling:
        return {"do_sample": True, "top_p": top_p, "temperature": temperature}
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(SortFreeTopP(top_p))
    processors.append(ReplayedMultinomial(generator))
    return {"do_sample": False, "top_p": None, "temperature": None, "logits_processor": processors}


def _prompt_groups(prompt_of_row: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(firsts (u,) the first row of each distinct prompt, expand (b,) each row's distinct index), or None
    when no prompt repeats (nothing to share)."""
    distinct = list(dict.fromkeys(prompt_of_row))
    if len(distinct) == len(prompt_of_row):
        return None
    firsts = torch.tensor([prompt_of_row.index(p) for p in distinct])
    expand = torch.tensor([distinct.index(p) for p in prompt_of_row])
    return firsts, expand


class _BatchInThread(threading.local):
    """What the run's hooks need to know of the batch that the calling thread generates: hooks are
    registered once per run, and batches may run in several threads at once."""

    def __init__(self) -> None:
        self.captured: list[torch.Tensor] = []  # per forward: (b, d) float32, the last position's lm_head input
        self.groups: tuple[torch.Tensor, torch.Tensor] | None = None  # until its prefill ran: (firsts, expand)


@contextmanager
def _capturing_head_inputs(model: nn.Module, running: _BatchInThread) -> Iterator[None]:
    """The last-position lm_head input of every forward, (b, d) float32 on CPU, appended to the `captured` list
    of the thread that runs it."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        hidden = args[0]  # (b, positions, d): all positions or only the last one
        running.captured.append(hidden[:, -1, :].detach().to("cpu", torch.float32))

    handle = output_layer(model).register_forward_pre_hook(hook)  # type: ignore[arg-type]
    try:
        yield
    finally:
        handle.remove()


_ROW_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


@contextmanager
def _sharing_prefills(model: nn.Module, running: _BatchInThread) -> Iterator[None]:
    """Run each thread's next forward, while it has `running.groups` = (firsts, expand), on rows `firsts`
    only, then gather its logits and cache to rows `expand`.

    For `model.generate` on a batch whose rows repeat prompts: its first forward is the prefill of the
    whole padded batch (b, L); it runs on the u distinct rows (u, L) at the same width, so every kept row
    computes exactly what it would have, and the result is gathered back to (b, ...) before decoding.
    firsts (u,) a row of each distinct prompt; expand (b,) the distinct index of every row.
    """

    def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        if running.groups is None:
            return None
        firsts, expand = running.groups
        if args or kwargs.get("input_ids") is None or kwargs["input_ids"].shape[0] != expand.shape[0]:
            raise RuntimeError("shared prefill expects generate's prefill: keyword input_ids of the whole batch")
        index = firsts.to(kwargs["input_ids"].device)
        return args, {key: value.index_select(0, index) if key in _ROW_INPUTS and torch.is_tensor(value) else value
                      for key, value in kwargs.items()}

    def after(_module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> Any:
        if running.groups is None:
            return None
        _firsts, expand = running.groups
        running.groups = None
        index = expand.to(output.logits.device)
        output.logits = output.logits.index_select(0, index)  # (u, 1, vocab) -> (b, 1, vocab)
        cache = getattr(output, "cache", None)  # earlier transformers 5 releases: past_key_values
        cache = getattr(output, "past_key_values", None) if cache is None else cache
        if cache is None:
            raise RuntimeError("shared prefill needs the prefill's KV cache (use_cache=True)")
        cache.reorder_cache(index)  # every layer's keys and values: (u, heads, L, hd) -> (b, heads, L, hd)
        return output

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _length_before_stop(tokens: list[int], stop: set[int]) -> int:
    for position, token in enumerate(tokens):
        if token in stop:
            return position
    return len(tokens)


@torch.inference_mode()
def capture_continuation_states(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 32,
    max_continuation_tokens: int | None = None,
    progress: bool = False,
    on_progress: Progress | None = None,
) -> Continuations:
    """Teacher forcing: the state before every token of each continuation, one forward pass per batch.

    Runs only the model body (`base_model`), whose last hidden state is the lm_head input, so the
    (tokens × vocab) projection is never computed. on_progress(continuations done, total) after every batch.
    """
    _check_prompts(prompts)
    if len(prompts) != len(continuations):
        raise InputError("prompts and continuations differ in number", field="prompts")
    tokenizer, model = lm.tokenizer, lm.model
    body = model.base_model
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    encoded = [tokenizer(c, add_special_tokens=False, return_offsets_mapping=True) for c in continuations]
    cont_ids = [e["input_ids"][:max_continuation_tokens] for e in encoded]
    spans = [[tuple(s) for s in e["offset_mapping"][: len(ids)]] for e, ids in zip(encoded, cont_ids, strict=True)]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise InputError("a prompt is empty after tokenization", field="prompts")
    n, width = len(prompts), max((len(c) for c in cont_ids), default=0)
    d = output_layer(model).in_features  # type: ignore[arg-type]
    token_ids = torch.full((n, max(width, 1)), -1, dtype=torch.long)
    states = torch.zeros(n, max(width, 1), d)
    lengths = torch.tensor([len(c) for c in cont_ids], dtype=torch.long)
    full = [p + c for p, c in zip(prompt_ids, cont_ids, strict=True)]
    done = 0
    for rows in tqdm(_length_sorted_batches([len(f) for f in full], batch_size), desc="capture", disable=not progress):
        batch = tokenizer.pad({"input_ids": [full[r] for r in rows]}, return_tensors="pt")
        mask = batch["attention_mask"].to(model.device)
        # Positions count real tokens only, so left padding changes nothing (absolute-position models too).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = body(input_ids=batch["input_ids"].to(model.device), attention_mask=mask, position_ids=positions)
        hidden = hidden.last_hidden_state.to("cpu", torch.float32)  # (b, L, d)
        width_b = hidden.shape[1]
        for j, row in enumerate(rows):
            length = int(lengths[row])
            if length == 0:
                continue
            # Left padding puts the continuation at the end; the state at position p produced token p + 1.
            start = width_b - length - 1
            states[row, :length] = hidden[j, start : start + length]
            token_ids[row, :length] = torch.tensor(cont_ids[row])
        done += len(rows)
        if on_progress is not None:
            on_progress(done, n)
    return Continuations(list(prompts), torch.arange(n), list(continuations), token_ids, lengths, states, spans)

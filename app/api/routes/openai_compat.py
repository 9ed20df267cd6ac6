"""OpenAI-compatible generation: /v1/chat/completions and /v1/completions, whole or streamed as server-sent
events, and /v1/models, on the served model with detox switched per request.

Detox is asked for with the body fields `detox` / `intervention` (the openai client's `extra_body=`), or
by naming the model `<model>:detox` (the active intervention) or `<model>:<intervention id>`.
Streaming is real: each row's `on_token` runs on the model thread as its token is chosen and hands it to
the event loop, and the text goes out as deltas that never split a character, each token decoded once. A client that goes away
cancels its generation, and its rows end at their next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from tokenizers.decoders import DecodeStream

from app.api.deps import GeneratorDep, MetricsDep, ServerDep, ServiceDep, SettingsDep
from app.api.errors import OPENAI_ERROR_RESPONSES, Problem, openai_type
from app.api.routes.generate import check_prompt_tokens, load_intervention
from app.metrics import Metrics
from app.openai_schemas import (
    Applied,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionCreate,
    CompletionParams,
    Detox,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
)
from app.serving import Batcher, Busy, GenerationOutput, GenerationRequest, ModelServer
from eigenshift_core.errors import InputError
from eigenshift_core.loading import Tokenizer
from workers.interventions import InterventionNotFound
from workers.job_service import JobService
from workers.jobs import TooLarge
from workers.owners import Caller
from workers.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERROR_RESPONSES)

DETOX_ALIAS = "detox"
REPLACEMENT = "\ufffd"  # what decoding shows for a character whose bytes have not all arrived
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's cap
SERVED_SINCE = int(time.time())  # `created` of the served model's cards
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAMED: dict[int | str, dict[str, Any]] = {200: {
    "description": "the completion; with `stream: true`, server-sent events of chunks ending with `data: [DONE]`",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}}


# Text of a choice, token by token.

def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest tail of `text` that begins some stop string (and may yet complete it)."""
    return max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:k])),
               default=0)


@dataclass
class ChoiceText:
    """One choice's text as its tokens arrive, handed out as deltas.

    Each push decodes only the new token (the tokenizer's streaming decoder, which holds back a character
    split over tokens) and hands out what is new, holding back any tail that may begin a stop string; so a
    choice costs time linear in its length. A stop string ends the choice and its text ends before it. At
    the end the whole text is decoded once more, so the deltas joined are exactly the tokens' text,
    streamed or not.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)  # up to the token that completed a stop string
    text: str = ""  # handed out so far
    stopped: bool = False
    decoded: str = field(default="", repr=False)  # the text of `token_ids` as far as it is decoded
    _stream: DecodeStream | None = field(default=None, repr=False)

    def push(self, token: int) -> str:
        """The new text after one more token ("" once stopped)."""
        if self.stopped:
            return ""
        self.token_ids.append(token)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            # no streaming decoder, or one whose text would differ: decode everything again
            self.decoded = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        else:
            if self._stream is None:
                self._stream = DecodeStream(skip_special_tokens=True)
            self.decoded += self._stream.step(backend, token) or ""  # None: a character's bytes are still coming
        return self._advance(final=False)

    def finish(self) -> str:
        """What was held back, once the row has ended."""
        if self.stopped:
            return ""
        self.decoded = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        # What was handed out never ends with the beginning of a stop string, so one can only begin after it.
        tail = self.decoded[len(self.text):]
        cut = first_stop(tail, self.stop)
        if cut is not None:
            self.stopped, delta = True, tail[:cut]
        elif final:
            delta = tail
        else:
            delta = tail.rstrip(REPLACEMENT)
            delta = delta[:len(delta) - stop_prefix_length(delta, self.stop)]
        self.text += delta
        return delta


# Tokens from the model thread to the event loop.

TokenEvent = tuple[int, int] | list[GenerationOutput]  # (row, token id) as chosen; at the end every row's output


async def stream_tokens(batcher: Batcher, requests: Sequence[GenerationRequest], wanted: Callable[[int], bool],
                        deadline: float, key: str = "") -> AsyncGenerator[TokenEvent, None]:
    """(row, token id) as the model thread chooses each token, then the outputs of all rows.

    After each token the model thread asks `wanted(row)` and ends the row when it says no. Closing the
    iterator (a client that went away) cancels the generation and ends its rows at their next token.
    Past `deadline` (event-loop time) it raises TimeoutError.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
    closed = threading.Event()

    def callback(row: int) -> Callable[[int], bool]:
        def on_token(token: int) -> bool:  # on the model thread
            if closed.is_set() or not wanted(row):
                return False
            try:
                loop.call_soon_threadsafe(events.put_nowait, (row, token))
            except RuntimeError:  # the event loop has closed: nobody is reading
                return False
            return True

        return on_token

    async def run() -> None:
        # Tokens are queued before the outputs: the batch's last callback runs before decode_batch returns.
        try:
            events.put_nowait(await batcher.generate([replace(r, on_token=callback(row))
                                                      for row, r in enumerate(requests)], key))
        except Exception as error:
            events.put_nowait(error)

    task = asyncio.create_task(run())
    try:
        while True:
            async with asyncio.timeout_at(deadline):
                event = await events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, list):
                return
    finally:  # also on cancellation: Batcher.generate cancels its futures and frees the rows
        closed.set()
        task.cancel()


# One request as rows.

@dataclass(frozen=True)
class Run:
    """One OpenAI request as batcher rows: each prompt n times, row i seeded with seed + i."""

    id: str
    created: int
    model: str
    requests: list[GenerationRequest]
    texts: list[ChoiceText]
    prompt_tokens: int
    applied: Applied
    deadline: float  # event-loop time
    key: str = ""  # the API key's name: the batcher's per-key share

    def usage(self) -> Usage:
        completion = sum(len(text.token_ids) for text in self.texts)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)


ChoiceEvent = tuple[int, str, FinishReason | None]  # (choice index, text delta, finish reason when it ends)


async def choice_events(run: Run, batcher: Batcher) -> AsyncGenerator[ChoiceEvent, None]:
    """Every choice's text deltas as its tokens arrive, then its finish reason (with its last delta)."""
    texts = run.texts
    async with aclosing(stream_tokens(batcher, run.requests, lambda row: not texts[row].stopped,
                                      run.deadline, run.key)) as tokens:
        async for event in tokens:
            if isinstance(event, list):  # every row has ended
                for row, output in enumerate(event):
                    if not texts[row].stopped:
                        yield row, texts[row].finish(), "stop" if output.finish_reason == "stop" else "length"
                return
            row, token = event
            delta = texts[row].push(token)
            if delta or texts[row].stopped:
                yield row, delta, "stop" if texts[row].stopped else None


def _unknown_model(name: str, served: str) -> Problem:
    return Problem(404, f"model {name!r} does not exist; this server serves {served!r}, {served}:{DETOX_ALIAS} "
                        f"and {served}:<intervention id>", field="model", slug="model-not-found")


def _intervention_id(body: CompletionParams, served: str, service: JobService, caller: Caller) -> str | None:
    """The intervention a request asks for, by its body fields or its model alias; None: the plain model.
    An alias naming another key's intervention is as unknown as one naming none."""
    base, colon, suffix = body.model.partition(":")
    if base != served or (colon and not suffix):
        raise _unknown_model(body.model, served)
    named = None if suffix in ("", DETOX_ALIAS) else suffix
    if named is not None:
        try:
            record = service.interventions.get(named, caller)
        except InterventionNotFound:
            raise _unknown_model(body.model, served) from None
        if record.model != served:
            raise _unknown_model(body.model, served)
    if body.intervention and named and body.intervention != named:
        raise InputError(f"intervention {body.intervention!r} contradicts model {body.model!r}", field="intervention")
    detox = body.detox if body.detox is not None else bool(suffix) or body.intervention is not None
    if not detox:
        return None
    chosen = body.intervention or named or service.interventions.active_id(served)
    if chosen is None:
        raise InputError(f"no intervention is active for model {served!r}: activate one or name one",
                         field="intervention")
    return chosen


def _check_prompt_chars(chars: int, settings: Settings) -> None:
    if chars > settings.max_prompt_chars:
        raise TooLarge(f"a prompt is longer than max_prompt_chars={settings.max_prompt_chars} characters")


def _token_budget(value: int | None, name: str, default: int, settings: Settings) -> int:
    if value is None:
        return min(default, settings.max_new_tokens_limit)
    if value > settings.max_new_tokens_limit:
        raise InputError(f"{name} is over max_new_tokens_limit={settings.max_new_tokens_limit}", field=name)
    return value


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[ChatMessage]) -> str:
    """The prompt for a chat: the tokenizer's chat template with the assistant's turn opened, or "role: content"
    lines when it has none."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{turn['role']}: {turn['content']}\n" for turn in turns) + "assistant:"
    try:
        return str(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
    except TemplateError as error:
        raise InputError(f"the chat template refused these messages: {error}", field="messages") from None


async def _plan(kind: str, prompts: list[str], fields: list[str], body: CompletionParams, max_tokens: int,
                settings: Settings, service: JobService, server: ModelServer, caller: Caller) -> Run:
    """The request as rows; `fields` name each prompt's field for a refusal."""
    key = caller.name or ""  # the batch's fair share is per API key
    rows = len(prompts) * body.n
    if rows > settings.max_generate_batch:
        raise TooLarge(f"{rows} choices ({len(prompts)} prompts, n={body.n}) in one request; "
                       f"max_generate_batch={settings.max_generate_batch}")
    counts = await check_prompt_tokens(server, prompts, [max_tokens] * len(prompts), settings, fields)
    intervention_id = await run_in_threadpool(_intervention_id, body, settings.model, service, caller)
    intervention = (await run_in_threadpool(load_intervention, server, service, intervention_id, caller)
                    if intervention_id else None)
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    tokenizer = server.lm.tokenizer
    rows_prompts = [prompt for prompt in prompts for _ in range(body.n)]
    requests = [GenerationRequest(prompt, max_tokens, body.temperature, body.top_p, (seed + row) % 2**31, intervention)
                for row, prompt in enumerate(rows_prompts)]
    prompt_tokens = sum(counts)  # as decode_batch encodes them
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    return Run(f"{kind}-{uuid.uuid4().hex}", int(time.time()), body.model, requests,
               [ChoiceText(tokenizer, body.stop_strings()) for _ in requests], prompt_tokens,
               Applied(detox=intervention_id is not None, intervention=intervention_id, seed=seed), deadline, key)


async def _finish_reasons(run: Run, batcher: Batcher) -> list[FinishReason]:
    """Run the whole generation; each choice's finish reason (its text is in `run.texts`)."""
    finishes: list[FinishReason] = ["length"] * len(run.requests)
    try:
        async for row, _, finish in choice_events(run, batcher):
            if finish is not None:
                finishes[row] = finish
    except TimeoutError:
        raise Problem(504, "generation took longer than the request timeout", slug="generation-timeout") from None
    return finishes


def _stream(chunks: AsyncIterator[BaseModel], run: Run, metrics: Metrics) -> StreamingResponse:
    """Server-sent events: one `data: <chunk>` per chunk, then `data: [DONE]`; an error that comes once the
    stream has begun is sent as OpenAI does, `data: {"error": ...}`, and ends it."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as error:
            message, status, code = _stream_error(error)
            envelope = {"message": message, "type": openai_type(status), "param": None, "code": code}
            yield f"data: {json.dumps({'error': envelope})}\n\n"
            return
        finally:
            metrics.tokens.labels(str(run.applied.detox).lower()).inc(run.usage().completion_tokens)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _stream_error(error: Exception) -> tuple[str, int, str]:
    """(message, status it would have had, code) of an error once the stream has begun."""
    if isinstance(error, TimeoutError):
        return "generation took longer than the request timeout", 504, "generation_timeout"
    if isinstance(error, Busy):  # the queue filled between the check and the start
        return str(error), 503, "generation_queue_full"
    log.exception("a streamed generation failed", exc_info=error)
    return "internal error; the server log has the details", 500, "internal_error"


async def _chat_chunks(run: Run, batcher: Batcher, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=run.id, created=run.created, model=run.model, choices=choices, usage=usage)

    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                 for i in range(len(run.requests))])
    async for row, delta, finish in choice_events(run, batcher):
        if delta:
            yield chunk([ChatChunkChoice(index=row, delta=ChatDelta(content=delta))])
        if finish is not None:
            yield chunk([ChatChunkChoice(index=row, delta=ChatDelta(), finish_reason=finish)])
    if include_usage:
        yield chunk([], run.usage())


async def _completion_chunks(run: Run, batcher: Batcher, include_usage: bool) -> AsyncIterator[CompletionChunk]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=run.id, created=run.created, model=run.model, choices=choices, usage=usage)

    async for row, delta, finish in choice_events(run, batcher):
        if delta:
            yield chunk([CompletionChoice(index=row, text=delta)])
        if finish is not None:
            yield chunk([CompletionChoice(index=row, text="", finish_reason=finish)])
    if include_usage:
        yield chunk([], run.usage())


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)
async def create_chat_completion(body: ChatCompletionCreate, settings: SettingsDep, service: ServiceDep,
                                 server: ServerDep, metrics: MetricsDep,
                                 caller: GeneratorDep) -> ChatCompletion | StreamingResponse:
    """Answer a chat, OpenAI style; `stream: true` sends each token as it is chosen."""
    _check_prompt_chars(sum(len(message.text()) for message in body.messages), settings)
    budget_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = _token_budget(body.max_completion_tokens or body.max_tokens, budget_name,
                               settings.max_new_tokens_limit, settings)
    prompt = chat_prompt(server.lm.tokenizer, body.messages)
    run = await _plan("chatcmpl", [prompt], ["messages"], body, max_tokens, settings, service, server, caller)
    if body.stream:
        server.batcher.check_room(len(run.requests))  # a full queue is a 503 before the stream begins
        return _stream(_chat_chunks(run, server.batcher, body.include_usage()), run, metrics)
    finishes = await _finish_reasons(run, server.batcher)
    metrics.tokens.labels(str(run.applied.detox).lower()).inc(run.usage().completion_tokens)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=text.text), finish_reason=finish)
               for i, (text, finish) in enumerate(zip(run.texts, finishes, strict=True))]
    return ChatCompletion(id=run.id, created=run.created, model=run.model, choices=choices, usage=run.usage(),
                          eigenshift=run.applied)


@router.post("/completions", response_model=Completion, responses=STREAMED)
async def create_completion(body: CompletionCreate, settings: SettingsDep, service: ServiceDep, server: ServerDep,
                            metrics: MetricsDep, caller: GeneratorDep) -> Completion | StreamingResponse:
    """Continue a prompt (or several), OpenAI style; `stream: true` sends each token as it is chosen."""
    prompts = body.prompts()
    for prompt in prompts:
        _check_prompt_chars(len(prompt), settings)
    max_tokens = _token_budget(body.max_tokens, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, settings)
    fields = ["prompt"] if isinstance(body.prompt, str) else [f"prompt.{i}" for i in range(len(prompts))]
    run = await _plan("cmpl", prompts, fields, body, max_tokens, settings, service, server, caller)
    if body.stream:
        server.batcher.check_room(len(run.requests))
        return _stream(_completion_chunks(run, server.batcher, body.include_usage()), run, metrics)
    finishes = await _finish_reasons(run, server.batcher)
    metrics.tokens.labels(str(run.applied.detox).lower()).inc(run.usage().completion_tokens)
    choices = [CompletionChoice(index=i, text=text.text, finish_reason=finish)
               for i, (text, finish) in enumerate(zip(run.texts, finishes, strict=True))]
    return Completion(id=run.id, created=run.created, model=run.model, choices=choices, usage=run.usage(),
                      eigenshift=run.applied)


def _model_cards(served: str, service: JobService, caller: Caller) -> list[ModelCard]:
    """The served model, its `:detox` alias (the active intervention) and one alias per intervention of it
    that `caller` may use."""
    active = service.interventions.active_id(served)
    records = service.interventions.list(caller, served)
    created = {r.id: int(r.created_at.timestamp()) for r in records}
    cards = [ModelCard(id=served, created=SERVED_SINCE, eigenshift=Detox(detox=False, intervention=None)),
             ModelCard(id=f"{served}:{DETOX_ALIAS}", created=created.get(active or "", SERVED_SINCE),
                       eigenshift=Detox(detox=True, intervention=active))]
    return cards + [ModelCard(id=f"{served}:{r.id}", created=created[r.id],
                              eigenshift=Detox(detox=True, intervention=r.id)) for r in records]


@router.get("/models")
async def list_models(settings: SettingsDep, service: ServiceDep, caller: GeneratorDep) -> ModelList:
    """List the served model and its detox aliases, OpenAI style."""
    return ModelList(data=await run_in_threadpool(_model_cards, settings.model, service, caller))


@router.get("/models/{model}")
async def read_model(model: str, settings: SettingsDep, service: ServiceDep, caller: GeneratorDep) -> ModelCard:
    """Read one model or detox alias."""
    cards = await run_in_threadpool(_model_cards, settings.model, service, caller)
    card = next((c for c in cards if c.id == model), None)
    if card is None:
        raise _unknown_model(model, settings.model)
    return card

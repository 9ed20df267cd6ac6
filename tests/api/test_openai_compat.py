"""The OpenAI-compatible endpoints, driven by the official `openai` client against the live server; the
incremental text and the streaming callback underneath them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from app import serving
from app.api.routes.openai_compat import ChoiceText, chat_prompt, first_stop, stop_prefix_length
from app.openai_schemas import ChatMessage
from app.serving import GenerationOutput, GenerationRequest, decode_batch
from eigenshift_core.loading import LoadedModel
from tests.api.conftest import SLOW_KEY, admin_key
from tests.conftest import byte_tokenizer
from workers.interventions import BUILTIN_ID
from workers.settings import Settings

PROMPTS = ["I can't believe you would say", "The worst people in the world are", "Shut up, you", "He is such a"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me about dogs."}]
GATE_S = 120  # only stops a hung test; never an assertion about speed


@pytest.fixture(scope="module")
def oai(live_server: str, settings: Settings, client: TestClient) -> openai.OpenAI:
    """The official client on the live server, with the built-in intervention active (other modules may have
    activated one of their own)."""
    assert client.post(f"/interventions/{BUILTIN_ID}/activate").status_code == 200
    return openai.OpenAI(base_url=live_server + "/v1", api_key=admin_key(settings), max_retries=0)


def _streamed_texts(chunks: Iterator[Any]) -> tuple[dict[int, str], dict[int, str], list[Any]]:
    """Text per choice index, finish reason per choice index, and the chunks."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    seen = list(chunks)
    for chunk in seen:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, seen


# Text of a choice, token by token.

@pytest.mark.parametrize("text", ["héllo 日本語 🎉 done", "plain ascii", "ünïcödé\n\ttabs 🎉🎉"])
def test_deltas_never_split_a_character_and_join_to_the_text(text: str, embedded: LoadedModel) -> None:
    for tokenizer in (byte_tokenizer(), embedded.tokenizer):  # one byte per token; real BPE merges
        ids = tokenizer(text)["input_ids"]
        choice = ChoiceText(tokenizer)
        deltas = [choice.push(token) for token in ids]
        deltas.append(choice.finish())
        assert "".join(deltas) == choice.text == tokenizer.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in delta for delta in deltas)
        if tokenizer is not embedded.tokenizer and any(ord(c) > 127 for c in text):
            assert "" in deltas[:-1]  # a character's first bytes were held back


def test_stop_strings_cut_the_text_and_hold_back_what_may_begin_one() -> None:
    tokenizer = byte_tokenizer()
    choice = ChoiceText(tokenizer, stop=("lo w",))
    deltas = [choice.push(token) for token in tokenizer("hello world")["input_ids"]]
    assert deltas == ["h", "e", "", "l", "", "", ""] + [""] * 4  # "l", "lo", "lo " might begin the stop string
    assert choice.text == "hel"
    assert choice.stopped and len(choice.token_ids) == len("hello w") and choice.finish() == ""
    held = ChoiceText(tokenizer, stop=("lo w",))
    assert "".join(held.push(t) for t in tokenizer("help")["input_ids"]) == "help"  # "l" released by "p"
    assert first_stop("abcabc", ["c", "bc"]) == 1 and first_stop("abc", ["x"]) is None
    assert stop_prefix_length("foo\n", ["\n\n"]) == 1 and stop_prefix_length("foo", ["\n\n", "oox"]) == 2
    assert stop_prefix_length("foo", ["x"]) == 0


def test_chat_prompt_uses_the_template_or_falls_back(embedded: LoadedModel) -> None:
    messages = [ChatMessage(role="developer", content="Be kind."),
                ChatMessage(role="user", content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}])]
    expected = embedded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}],
        add_generation_prompt=True, tokenize=False)
    assert embedded.tokenizer.chat_template and chat_prompt(embedded.tokenizer, messages) == expected
    assert chat_prompt(byte_tokenizer(), messages) == "system: Be kind.\nuser: Hi there\nassistant:"


# The streaming callback of decode_batch.

def test_on_token_sees_each_kept_token_as_it_is_chosen_and_can_end_its_row(tiny_llama: LoadedModel) -> None:
    seen: list[int] = []

    def record(token: int) -> bool:
        seen.append(token)
        return True

    plain = [GenerationRequest(p, 12, 0.0, 1.0, 0) for p in ("abc", "hello there")]
    reference = decode_batch(tiny_llama, plain)
    watched = decode_batch(tiny_llama, [plain[0], replace(plain[1], on_token=record)])
    assert watched == reference and seen == reference[1].token_ids  # each kept token once, in order

    def stop_after_four(token: int) -> bool:
        seen.append(token)
        return len(seen) < 4

    seen.clear()
    ended = decode_batch(tiny_llama, [plain[0], replace(plain[1], on_token=stop_after_four)])
    assert ended[0] == reference[0] and ended[1].token_ids == reference[1].token_ids[:4]
    assert ended[1].finish_reason == "stop" and len(reference[1].token_ids) > 4


# The endpoints, through the openai client.

def _gate_decode_batch(monkeypatch: pytest.MonkeyPatch, hold: Callable[[Callable[[int], bool], int], bool]
                       ) -> list[list[GenerationOutput]]:
    """Route the live server's rows through `hold(on_token, token)` for every streamed token (it runs on the
    model thread and answers for the row); the outputs of the rows that end in a step are returned in the list."""
    batches: list[list[GenerationOutput]] = []
    add, step = serving.Decoder.add, serving.Decoder.step

    def gated_add(self: serving.Decoder, request: GenerationRequest, *args: Any) -> serving.Row:
        def wrap(on_token: Callable[[int], bool]) -> Callable[[int], bool]:
            return lambda token: hold(on_token, token)

        return add(self, replace(request, on_token=wrap(request.on_token)) if request.on_token else request, *args)

    def recorded_step(self: serving.Decoder) -> list[serving.Row]:
        ended = step(self)
        if ended:
            batches.append([row.output(self.lm.tokenizer) for row in ended])
        return ended

    monkeypatch.setattr(serving.Decoder, "add", gated_add)
    monkeypatch.setattr(serving.Decoder, "step", recorded_step)
    return batches


def test_streamed_tokens_reach_the_client_while_the_model_is_still_generating(
        oai: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    client_saw_text = threading.Event()
    waited: list[bool] = []

    def hold(on_token: Callable[[int], bool], token: int) -> bool:
        keep = on_token(token)
        if not waited:  # the model thread stops after its first token until the client has read it
            waited.append(client_saw_text.wait(GATE_S))
        return keep

    batches = _gate_decode_batch(monkeypatch, hold)
    stream = oai.completions.create(model="embedded", prompt="The capital of France is", max_tokens=6,
                                    temperature=0, stream=True)
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            client_saw_text.set()
            text += chunk.choices[0].text
    assert waited == [True] and len(batches) == 1 and len(batches[0][0].token_ids) == 6
    assert text and text == oai.completions.create(model="embedded", prompt="The capital of France is", max_tokens=6,
                                                   temperature=0).choices[0].text


def test_a_client_that_goes_away_ends_its_generation(oai: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    client_left = threading.Event()
    answers: list[bool] = []

    def hold(on_token: Callable[[int], bool], token: int) -> bool:
        keep = on_token(token)
        if keep and client_left.wait(GATE_S):
            # Ask again until the server has seen the disconnect (a repeated token goes to nobody).
            deadline = time.monotonic() + GATE_S
            while (keep := on_token(token)) and time.monotonic() < deadline:
                time.sleep(0.05)
        answers.append(keep)
        return keep

    batches = _gate_decode_batch(monkeypatch, hold)
    stream = oai.chat.completions.create(model="embedded", messages=CHAT, max_tokens=64, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    client_left.set()
    deadline = time.monotonic() + GATE_S
    while not batches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answers == [False] and len(batches) == 1 and len(batches[0][0].token_ids) == 1  # not 64


def test_chat_whole_and_streamed_agree_and_count_tokens(oai: openai.OpenAI, client: TestClient,
                                                        embedded: LoadedModel) -> None:
    request: dict[str, Any] = {"model": "embedded", "messages": CHAT, "max_tokens": 12, "temperature": 0, "seed": 3}
    whole = oai.chat.completions.create(**request)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "embedded" and whole.id.startswith("chatcmpl-")
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt = embedded.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    reference = client.get("/generate", params={"prompt": prompt, "max_new_tokens": 12, "detox": False}).json()["data"][0]
    assert choice.message.content == reference["text"] and choice.finish_reason == reference["finish_reason"]
    assert whole.usage.prompt_tokens == len(embedded.tokenizer(prompt)["input_ids"])
    assert whole.usage.completion_tokens == len(reference["token_ids"]) > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.model_extra["eigenshift"] == {"detox": False, "intervention": None, "seed": 3}

    texts, finishes, chunks = _streamed_texts(oai.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}))
    assert texts == {0: choice.message.content} and finishes == {0: choice.finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len({c.id for c in chunks}) == 1 and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    _, _, without_usage = _streamed_texts(oai.chat.completions.create(**request, stream=True))
    assert all(c.usage is None for c in without_usage) and without_usage[-1].choices[0].finish_reason


def test_completions_for_several_prompts_and_choices(oai: openai.OpenAI, embedded: LoadedModel) -> None:
    request: dict[str, Any] = {"model": "embedded", "prompt": PROMPTS[:2], "n": 2, "max_tokens": 5,
                               "temperature": 0.9, "seed": 11}
    whole = oai.completions.create(**request)
    assert whole.object == "text_completion" and [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.usage.prompt_tokens == sum(len(embedded.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert 0 < whole.usage.completion_tokens <= 4 * 5
    texts, finishes, chunks = _streamed_texts(oai.completions.create(**request, stream=True,
                                                                     stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage == whole.usage
    again = oai.completions.create(**request)
    assert [c.text for c in again.choices] == [c.text for c in whole.choices]  # the seed is the seed
    single = oai.completions.create(model="embedded", prompt=PROMPTS[0])
    assert single.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_stop_strings_end_choices_streamed_or_not(oai: openai.OpenAI) -> None:
    base: dict[str, Any] = {"model": "embedded", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
    full = oai.completions.create(**base)
    text = full.choices[0].text
    assert len(text) >= 8
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = oai.completions.create(**base, stop=[stop, "never appears"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    texts, finishes, chunks = _streamed_texts(oai.completions.create(**base, stop=stop, stream=True,
                                                                     stream_options={"include_usage": True}))
    assert texts == {0: cut.choices[0].text} and finishes == {0: "stop"} and chunks[-1].usage == cut.usage


def test_detox_by_alias_equals_detox_by_extra_body(oai: openai.OpenAI) -> None:
    def texts(model: str, **extra: Any) -> list[str]:
        answer = oai.completions.create(model=model, prompt=PROMPTS, max_tokens=10, temperature=0,
                                        extra_body=extra or None)
        return [c.text for c in answer.choices]

    plain = texts("embedded")
    detox = texts("embedded", detox=True)
    assert texts("embedded:detox") == detox == texts(f"embedded:{BUILTIN_ID}") == texts("embedded", intervention=BUILTIN_ID)
    assert texts("embedded:detox", detox=False) == plain  # the body field wins over the alias
    assert detox != plain  # alpha = 0 on 8 directions changes some greedy continuation
    applied = oai.chat.completions.create(model="embedded:detox", messages=CHAT, max_tokens=2).model_extra
    assert applied["eigenshift"]["detox"] is True and applied["eigenshift"]["intervention"] == BUILTIN_ID
    streamed, _, _ = _streamed_texts(oai.completions.create(model="embedded:detox", prompt=PROMPTS, max_tokens=10,
                                                            temperature=0, stream=True))
    assert [streamed[i] for i in range(len(PROMPTS))] == detox


def test_models_list_the_served_model_and_its_detox_aliases(oai: openai.OpenAI) -> None:
    cards = {m.id: m for m in oai.models.list().data}
    assert {"embedded", "embedded:detox", f"embedded:{BUILTIN_ID}"} <= set(cards)
    assert all(c.object == "model" and c.owned_by == "eigenshift" and c.created > 0 for c in cards.values())
    assert cards["embedded"].model_extra["eigenshift"] == {"detox": False, "intervention": None}
    assert cards["embedded:detox"].model_extra["eigenshift"]["intervention"] == BUILTIN_ID
    assert oai.models.retrieve("embedded:detox") == cards["embedded:detox"]
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("gpt-4o")
    assert missing.value.param == "model" and missing.value.code == "model_not_found"


def test_errors_come_back_as_the_clients_exceptions(oai: openai.OpenAI, live_server: str,
                                                    settings: Settings) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_server + "/v1", api_key="wrong", max_retries=0).models.list()
    cases: list[tuple[type[openai.APIStatusError], str | None, dict[str, Any]]] = [
        (openai.NotFoundError, "model", {"model": "gpt-4o"}),
        (openai.NotFoundError, "model", {"model": "embedded:no-such-intervention"}),
        (openai.NotFoundError, "model", {"model": "gpt-4o", "stream": True}),
        (openai.UnprocessableEntityError, "intervention", {"extra_body": {"intervention": "no-such-intervention"}}),
        (openai.UnprocessableEntityError, "max_tokens", {"max_tokens": settings.max_new_tokens_limit + 1}),
        (openai.UnprocessableEntityError, "max_completion_tokens",
         {"max_completion_tokens": settings.max_new_tokens_limit + 1}),
        (openai.UnprocessableEntityError, "temperature", {"temperature": 3}),
        (openai.UnprocessableEntityError, "stop", {"stop": ["a", "b", "c", "d", "e"]}),
        (openai.APIStatusError, None, {"messages": [{"role": "user", "content": "x" * (settings.max_prompt_chars + 1)}]}),
        (openai.APIStatusError, None, {"n": settings.max_generate_batch + 1}),
    ]
    for error, field, change in cases:
        request: dict[str, Any] = {"model": "embedded", "messages": CHAT, "max_tokens": 2, **change}
        with pytest.raises(error) as raised:
            oai.chat.completions.create(**request)
        assert raised.value.param == field and raised.value.body["param"] == field, change
        assert field is not None or raised.value.status_code == 413
        assert raised.value.response.headers["content-type"] == "application/json"
    with pytest.raises(openai.APIStatusError) as too_long:
        oai.completions.create(model="embedded", prompt=["ok", "y" * (settings.max_prompt_chars + 1)], max_tokens=2)
    assert too_long.value.status_code == 413 and "max_prompt_chars" in too_long.value.message


def _envelope(error: openai.APIStatusError, status: int, kind: str, param: str | None, code: str) -> str:
    """The error's message, after checking that it came in OpenAI's envelope and that the SDK read it."""
    assert error.status_code == status and error.response.headers["content-type"] == "application/json"
    envelope = error.response.json()
    assert set(envelope) == {"error"} and set(envelope["error"]) == {"message", "type", "param", "code"}
    assert error.body == envelope["error"] and (error.type, error.param, error.code) == (kind, param, code)
    assert envelope["error"]["message"] and envelope["error"]["message"] in str(error)  # not just "Error code: 404"
    return str(envelope["error"]["message"])


def test_errors_come_in_openais_envelope_with_our_message(oai: openai.OpenAI, live_server: str,
                                                          settings: Settings) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert "'nope' does not exist" in _envelope(unknown.value, 404, "invalid_request_error", "model",
                                                "model_not_found")
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=live_server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert "API key" in _envelope(refused.value, 401, "authentication_error", None, "unauthorized")
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        oai.completions.create(model="embedded", prompt="Hi", max_tokens=2, temperature=3)
    assert "temperature" in _envelope(invalid.value, 422, "invalid_request_error", "temperature", "invalid_field")
    with pytest.raises(openai.UnprocessableEntityError) as empty:
        oai.moderations.create(input=[])
    assert "at least one text" in _envelope(empty.value, 422, "invalid_request_error", "input", "invalid_field")
    with pytest.raises(openai.APIStatusError) as large:
        oai.chat.completions.create(model="embedded", max_tokens=2,
                                    messages=[{"role": "user", "content": "x" * settings.max_body_bytes}])
    assert "max_body_bytes" in _envelope(large.value, 413, "invalid_request_error", None, "content_too_large")
    slow = openai.OpenAI(base_url=live_server + "/v1", api_key=SLOW_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(10):  # the key's bucket holds 2 requests and refills one per 5 s
            slow.models.retrieve("embedded")
    assert "rate limit" in _envelope(limited.value, 429, "rate_limit_error", None, "rate_limited")
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_a_server_error_on_an_openai_route_is_in_the_envelope(client: TestClient) -> None:
    state = client.app.state  # type: ignore[attr-defined]
    server, state.server = state.server, None  # as while the model is loading
    try:
        answer = client.post("/v1/completions", json={"model": "embedded", "prompt": "Hi", "max_tokens": 2})
        elsewhere = client.get("/generate", params={"prompt": "Hi"})  # our own routes keep problem+json
    finally:
        state.server = server
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": {"message": "the model is not loaded yet", "type": "server_error",
                                       "param": None, "code": "model_loading"}}
    assert elsewhere.status_code == 503 and elsewhere.headers["content-type"] == "application/problem+json"


def test_a_failed_generation_is_an_error_whole_or_streamed(live_server: str, settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    oai = openai.OpenAI(base_url=live_server + "/v1", api_key=admin_key(settings), max_retries=0)  # its own connection

    def broken(self: serving.Decoder) -> list[serving.Row]:
        raise RuntimeError("the model thread failed")

    monkeypatch.setattr(serving.Decoder, "step", broken)
    stream = oai.chat.completions.create(model="embedded", messages=CHAT, max_tokens=2, stream=True)
    assert next(stream).choices[0].delta.role == "assistant"  # the stream had begun: the error comes as an event
    with pytest.raises(openai.APIError) as failed:
        list(stream)
    assert "internal error" in failed.value.message
    assert failed.value.body == {"message": failed.value.message, "type": "server_error", "param": None,
                                 "code": "internal_error"}
    with pytest.raises(openai.InternalServerError):  # last: uvicorn drops the connection after an unhandled error
        oai.chat.completions.create(model="embedded", messages=CHAT, max_tokens=2)

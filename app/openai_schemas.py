"""Bodies of the OpenAI-compatible endpoints (/v1/chat/completions, /v1/completions, /v1/models).

Requests ignore fields they do not know, as OpenAI does; the fields they define are validated. Two of
them are ours: `detox` and `intervention` (the openai client sends them with `extra_body=`).
Responses and stream chunks have OpenAI's shapes, plus an `eigenshift` object saying what was applied.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from app.schemas import UnicodeText

FinishReason = Literal["stop", "length"]
StopString = Annotated[str, Field(min_length=1, max_length=200)]
INTERVENTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="end the stream with a chunk holding the usage")


class CompletionParams(UnicodeText):
    """What chat and text completions share: the model, sampling, stop strings, streaming, detox."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=300,
                       description="the served model; `<model>:detox` detoxifies with the active intervention, "
                                   "`<model>:<intervention id>` with that one")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="choices per prompt")
    stop: Annotated[list[StopString], Field(max_length=4)] | StopString | None = Field(
        None, description="up to 4 strings that end a choice (not included in its text)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="default: a random seed, echoed back")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    detox: bool | None = Field(None, description="apply an intervention; when given it wins over the model alias")
    intervention: str | None = Field(None, pattern=INTERVENTION_PATTERN,
                                     description="intervention id (implies detox); default: the model's active one")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionCreate(CompletionParams):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")


class CompletionCreate(CompletionParams):
    """Body of POST /v1/completions."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1)] = Field(
        ..., description="a prompt, or several (each gets n choices)")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Detox(BaseModel):
    """What EigenShift applies to a model's generations."""

    detox: bool
    intervention: str | None = Field(description="the intervention applied to the lm_head input, if any")


class Applied(Detox):
    """What EigenShift applied to a generation, and its seed (row i is seeded with seed + i)."""

    seed: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    eigenshift: Applied


class ChatDelta(BaseModel):
    """A piece of the assistant message; only the keys it sets are sent, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None  # None in stream chunks before the choice ends
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    eigenshift: Applied


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion (OpenAI gives it the same `object`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A model a client may name: the served model or one of its detox aliases."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eigenshift"
    eigenshift: Detox


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

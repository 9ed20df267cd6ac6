"""Moderation in other services' shapes: OpenAI's POST /v1/moderations and Perspective's
POST /v1alpha1/comments:analyze, both on our scorers (the mapping is in `app.moderation`). Errors follow
the shapes too: OpenAI's envelope on the first, problem+json on the second.

Neither route logs or keeps the texts. Under Perspective's `doNotStore`, a scorer error is re-raised
without its message or cause, since those may quote the text and the 500 handler logs the traceback.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.auth import requires
from app.api.deps import SettingsDep
from app.api.errors import OPENAI_ERROR_RESPONSES, PROBLEM_JSON, Problem, problem, shorten
from app.moderation import category_scores, flag_categories, perspective_scores, toxicity_of
from app.schemas import UnicodeText
from eigenshift_core.errors import InputError, unknown_name
from eigenshift_core.scoring import WORD_PATTERN, Scorer, WordSpan, load_scorer
from workers.jobs import TooLarge
from workers.scorers import grant_scorer
from workers.settings import Settings

router = APIRouter(tags=["moderation"])
PROBLEM_RESPONSE: dict[str, Any] = {"content": {PROBLEM_JSON: {}}}
MAX_ATTRIBUTES = 32  # Perspective has fewer than 20; a refusal names at most MAX_UNSERVED_SHOWN of them
MAX_UNSERVED_SHOWN = 5


class ModerationRequest(UnicodeText):
    """Body of POST /v1/moderations (OpenAI's shape; text inputs only)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(..., description="a text, or a list of texts scored as one batch")
    model: str | None = Field(None, description="the scorer; default: the server's `scorer`")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must hold at least one text")
        return value


class ModerationSpan(BaseModel):
    """A word pushing its text toward toxic: `text == input[begin:end]`; `score` is its attribution."""

    begin: int
    end: int
    score: float
    text: str


class EigenShiftModeration(BaseModel):
    """What OpenAI's shape has no room for: P(toxic), every raw label of the scorer, the words to blame."""

    toxicity: float
    labels: dict[str, float]
    spans: list[ModerationSpan]


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    eigenshift: EigenShiftModeration


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class PerspectiveComment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    type: Literal["PLAIN_TEXT"] = "PLAIN_TEXT"


class AttributeParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scoreType: Literal["PROBABILITY"] = "PROBABILITY"
    scoreThreshold: float | None = Field(None, ge=0, le=1, description="leave the attribute out below this")


class AnalyzeCommentRequest(UnicodeText):
    """Body of POST /v1alpha1/comments:analyze (Perspective's shape)."""

    model_config = ConfigDict(extra="forbid")

    comment: PerspectiveComment
    requestedAttributes: dict[str, AttributeParameters] = Field(..., min_length=1, max_length=MAX_ATTRIBUTES)
    languages: list[str] = Field(default_factory=list, description="English only: the scorers' language")
    doNotStore: bool = Field(False, description="nothing here stores texts; this also keeps errors text-free")
    spanAnnotations: bool = Field(False, description="score every word of the comment on its own")
    clientToken: str | None = Field(None, max_length=256, description="echoed back")
    sessionId: str | None = Field(None, max_length=256, description="accepted and ignored")
    communityId: str | None = Field(None, max_length=256, description="accepted and ignored")
    context: dict[str, object] | None = Field(None, description="accepted and ignored")


class PerspectiveScore(BaseModel):
    value: float
    type: Literal["PROBABILITY"] = "PROBABILITY"


class PerspectiveSpanScore(BaseModel):
    """One word of the comment (`text[begin:end]`) and the attribute's probability for that word alone."""

    begin: int
    end: int
    score: PerspectiveScore


class AttributeScores(BaseModel):
    summaryScore: PerspectiveScore
    spanScores: list[PerspectiveSpanScore] | None = None


class AnalyzeCommentResponse(BaseModel):
    attributeScores: dict[str, AttributeScores]
    languages: list[str]
    detectedLanguages: list[str]
    clientToken: str | None = None


class ScoringFailed(Exception):
    """The scorer raised on a doNotStore request; its message and cause are dropped."""


def _check_caps(texts: Sequence[str], settings: Settings) -> None:
    if len(texts) > settings.max_generate_batch:
        raise TooLarge(f"{len(texts)} texts; max_generate_batch={settings.max_generate_batch}")
    if any(len(text) > settings.max_prompt_chars for text in texts):
        raise TooLarge(f"a text is longer than max_prompt_chars={settings.max_prompt_chars} characters")


def _allowed_scorer(name: str | None, settings: Settings) -> str:
    allowed = list(dict.fromkeys([*settings.moderation_scorers, settings.scorer]))
    if name is None:
        return settings.scorer
    if name not in allowed:
        raise unknown_name("model", name, allowed, field="model")
    return grant_scorer(settings, name, field="model")


def _labels_and_spans(scorer: Scorer, texts: list[str]) -> tuple[list[dict[str, float]], list[list[WordSpan]]]:
    """One scorer call for the whole batch, then the word attributions of each text."""
    return scorer.score_labels(texts), [scorer.attribute_words(text) for text in texts]


@router.post("/v1/moderations", dependencies=[requires("score")], responses=OPENAI_ERROR_RESPONSES)
async def create_moderation(body: ModerationRequest, settings: SettingsDep) -> ModerationResponse:
    """Classify texts in OpenAI's moderation shape, with P(toxic), raw labels and blamed words under `eigenshift`."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    _check_caps(texts, settings)
    spec = _allowed_scorer(body.model, settings)
    scorer = await run_in_threadpool(load_scorer, spec)
    rows, spans = await run_in_threadpool(_labels_and_spans, scorer, texts)
    thresholds = {str(category): value for category, value in settings.moderation_thresholds.items()}
    results = []
    for text, row, words in zip(texts, rows, spans, strict=True):
        labels = {name: float(score) for name, score in row.items()}
        scores = category_scores(labels)
        flags = flag_categories(scores, thresholds, settings.moderation_threshold)
        blamed = [ModerationSpan(begin=w.start, end=w.end, score=w.score, text=text[w.start:w.end])
                  for w in words if w.score > 0]
        extra = EigenShiftModeration(toxicity=toxicity_of(labels), labels=labels, spans=blamed)
        results.append(ModerationResult(flagged=any(flags.values()), categories=flags, category_scores=scores,
                                        eigenshift=extra))
    return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=spec, results=results)


def _check_languages(languages: list[str]) -> list[str]:
    unsupported = [language for language in languages if language.lower().split("-")[0] != "en"]
    if unsupported:
        raise Problem(400, f"language {unsupported[0]!r} is not supported: the scorers read English only",
                      field="languages", slug="language-not-supported")
    return languages or ["en"]


def _score_labels(scorer: Scorer, texts: list[str], private: bool) -> list[dict[str, float]]:
    try:
        return scorer.score_labels(texts)
    except InputError:
        raise
    except Exception as error:
        if not private:
            raise
        failure = type(error).__name__
    # Raised outside the `except`, so it has no __context__: `from None` is not enough, since Starlette's
    # middleware re-raises an error `from` its suppressed context and the log would print the text.
    raise ScoringFailed(f"the scorer raised {failure}")


def _unserved(requested: Sequence[str], served: Sequence[str], scorer: str) -> JSONResponse:
    """400 naming the first few attributes the scorer does not serve (never all: the names are the client's)."""
    errors = [{"field": f"requestedAttributes.{shorten(name)}",
               "message": f"attribute {shorten(name)!r} is not served by scorer {scorer!r}; served: {', '.join(served)}"}
              for name in requested[:MAX_UNSERVED_SHOWN]]
    return problem(400, errors[0]["message"], field=errors[0]["field"], slug="attribute-not-served",
                   extra={"errors": errors})


@router.post("/v1alpha1/comments:analyze", dependencies=[requires("score")], response_model_exclude_none=True,
             response_model=AnalyzeCommentResponse,
             responses={400: PROBLEM_RESPONSE, 413: PROBLEM_RESPONSE, 422: PROBLEM_RESPONSE})
async def analyze_comment(body: AnalyzeCommentRequest, settings: SettingsDep) -> AnalyzeCommentResponse | JSONResponse:
    """Score a comment in Perspective's shape: TOXICITY always, Detoxify's attributes when the scorer has them."""
    text = body.comment.text
    _check_caps([text], settings)
    languages = _check_languages(body.languages)
    scorer = await run_in_threadpool(load_scorer, settings.scorer)
    # The comment first, then each distinct word on its own: one scorer call.
    words = list(WORD_PATTERN.finditer(text)) if body.spanAnnotations else []
    distinct = list(dict.fromkeys(word.group() for word in words))
    rows = await run_in_threadpool(_score_labels, scorer, [text, *distinct], body.doNotStore)
    summary = perspective_scores(rows[0])
    unserved = [name for name in body.requestedAttributes if name not in summary]
    if unserved:
        return _unserved(unserved, list(summary), settings.scorer)
    by_word = dict(zip(distinct, (perspective_scores(row) for row in rows[1:]), strict=True))
    attributes = {}
    for name, parameters in body.requestedAttributes.items():
        if parameters.scoreThreshold is not None and summary[name] < parameters.scoreThreshold:
            continue
        spans = [PerspectiveSpanScore(begin=w.start(), end=w.end(), score=PerspectiveScore(value=by_word[w.group()][name]))
                 for w in words] if body.spanAnnotations else None
        attributes[name] = AttributeScores(summaryScore=PerspectiveScore(value=summary[name]), spanScores=spans)
    return AnalyzeCommentResponse(attributeScores=attributes, languages=languages, detectedLanguages=["en"],
                                  clientToken=body.clientToken)

"""Request and response bodies. Job bodies are the workers' specs (the worker re-reads them), named here
in the `JobCreate` / `JobPublic` / `JobsPublic` families."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from workers.jobs import JobError, JobRecord, JobState, Progress, WebhookDelivery
from workers.specs import EvaluateSpec, ExtractSpec, GenerateSpec, PipelineSpec, ReconstructSpec

SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON value (`[2].text`, `` for the value itself) a string holds a lone surrogate.
    JSON may spell one (`"\\ud800"`) and Python decodes it, but no UTF-8 text holds it: left in, it breaks
    the tokenizer, the job record and the answer's own encoding."""
    if isinstance(value, str):
        return path if SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and SURROGATE.search(key):
            return f"{path}.<key>"
        found = lone_surrogate_at(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}")
        if found is not None:
            return found
    return None


class UnicodeText(BaseModel):
    """Mixed into request bodies: every field's text must be valid Unicode (422 naming the field otherwise)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_lone_surrogates(cls, value: Any, info: ValidationInfo) -> Any:
        where = lone_surrogate_at(value)
        if where is not None:
            raise ValueError(f"{info.field_name}{where} holds a lone UTF-16 surrogate: text must be valid Unicode")
        return value


class GenerateJobCreate(GenerateSpec, UnicodeText):
    """Body of POST /jobs/generate."""


class ExtractJobCreate(ExtractSpec, UnicodeText):
    """Body of POST /jobs/extract."""


class ReconstructJobCreate(ReconstructSpec, UnicodeText):
    """Body of POST /jobs/reconstruct: an extract job's id, or a prompt source (generate → extract → reconstruct)."""


class EvaluateJobCreate(EvaluateSpec, UnicodeText):
    """Body of POST /jobs/evaluate."""


class PipelineJobCreate(PipelineSpec, UnicodeText):
    """Body of POST /jobs/pipeline."""


class Link(BaseModel):
    name: str
    href: str


class JobPublic(BaseModel):
    """A job as clients see it."""

    id: str
    kind: str
    state: JobState
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    cancel_requested: bool
    steps: list[str]
    steps_done: list[str]
    params: dict[str, Any]
    intervention_id: str | None
    links: dict[str, str]
    artifacts: list[Link]
    worker_losses: int = Field(0, description="times a worker died mid-step and the step was requeued")
    deliveries: list[WebhookDelivery] = Field(default_factory=list, description="webhook attempts, oldest first")

    @classmethod
    def from_record(cls, record: JobRecord) -> JobPublic:
        links = {"self": f"/jobs/{record.id}", "cancel": f"/jobs/{record.id}/cancel"}
        if record.intervention_id:
            links["intervention"] = f"/interventions/{record.intervention_id}"
        return cls(
            id=record.id, kind=record.kind, state=record.state, progress=record.progress,
            created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at,
            error=record.error, cancel_requested=record.cancel_requested, steps=record.steps,
            steps_done=record.steps_done, params=record.params, intervention_id=record.intervention_id, links=links,
            artifacts=[Link(name=n, href=f"/jobs/{record.id}/artifacts/{n}") for n in record.artifacts],
            worker_losses=record.worker_losses, deliveries=record.deliveries,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    offset: int
    limit: int


class InterventionPublic(BaseModel):
    """An intervention: model, k, α, metrics and provenance."""

    id: str
    model: str
    k: int
    alpha: list[float]
    criterion: str | None
    active: bool
    metrics: dict[str, Any] | None
    provenance: dict[str, Any]
    job_id: str | None
    created_at: datetime


class InterventionsPublic(BaseModel):
    data: list[InterventionPublic]
    count: int


class GenerateItem(UnicodeText):
    """One prompt of POST /generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1)
    detox: bool = Field(True, description="apply the intervention (as an lm_head hook) to this prompt")
    intervention: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                     description="intervention id; default: the model's active one")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, le=10, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="default: a random seed, echoed back")


class GenerateBatch(BaseModel):
    """Body of POST /generate: prompts that run together, each with its own settings."""

    model_config = ConfigDict(extra="forbid")

    items: list[GenerateItem] = Field(..., min_length=1)
    score: bool = Field(False, description="also score each output with the configured scorer")


class Generation(BaseModel):
    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    detox: bool
    intervention: str | None
    seed: int
    toxicity: float | None = None


class GenerationsPublic(BaseModel):
    model: str
    data: list[Generation]


class ScoreRequest(UnicodeText):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(..., min_length=1)


class ScoresPublic(BaseModel):
    scorer: str
    scores: list[float]


class FilePublic(BaseModel):
    id: str
    bytes: int


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = Field(default_factory=dict)

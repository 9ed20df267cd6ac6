"""What each job kind is asked to do: validated bodies, stored in the job record and re-read by the worker.

These check what needs no settings (types, ranges, exactly-one rules); `workers.submit.check_spec` checks
the rest (allowed models, data root, sizes) before anything is written.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JobKind = Literal["generate", "extract", "reconstruct", "evaluate", "pipeline"]
Step = Literal["generate", "extract", "reconstruct", "evaluate"]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class PromptSource(BaseModel):
    """Exactly one of: a list of texts, an uploaded file, a path under the data root, a hub dataset."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, description="the prompts themselves")
    file_id: str | None = Field(None, pattern=ID_PATTERN, description="id returned by POST /files")
    path: str | None = Field(None, min_length=1, max_length=1024, description="CSV/JSONL/TXT under the data root")
    hub_dataset: str | None = Field(None, min_length=1, max_length=200, description="a Hugging Face dataset id")
    split: str = Field("train", pattern=r"^[A-Za-z0-9_.\[\]:%-]{1,64}$", description="hub dataset split")
    column: str = Field("prompt", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="hub dataset text column")

    @model_validator(mode="after")
    def _exactly_one(self) -> PromptSource:
        given = [name for name in ("texts", "file_id", "path", "hub_dataset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of texts, file_id, path, hub_dataset (got {given or 'none'})")
        if self.texts is not None:
            if not self.texts:
                raise ValueError("texts must not be empty")
            if any(not text.strip() for text in self.texts):
                raise ValueError("texts must not contain empty prompts")
        return self


class JobSpec(BaseModel):
    """Fields every job kind shares."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded", min_length=1, max_length=200, description="a model the service allows")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    samples: int = Field(25, ge=1, le=1000, description="continuations per prompt")
    max_new_tokens: int = Field(20, ge=1, le=1024)
    top_p: float = Field(0.95, gt=0, le=1)
    temperature: float = Field(1.0, gt=0, le=10)
    batch_size: int = Field(32, ge=1, le=1024)
    callback_url: str | None = Field(None, min_length=1, max_length=2048,
                                     description="POSTed the signed job record when the job ends (an allowed host)")


class ScoredSpec(JobSpec):
    scorer: str = Field("profanity", min_length=1, max_length=300, description="profanity, hf:<id>, detoxify:<ckpt>")
    threshold: float = Field(0.5, ge=0, le=1)


class ExtractFields(ScoredSpec):
    top_words: int = Field(3, ge=1, le=50)
    max_nontoxic: int = Field(200_000, ge=1, le=10_000_000)
    reference_csv: str | None = Field(None, min_length=1, max_length=1024,
                                      description="a step-2 CSV under the data root, teacher-forced into the states")


class ReconstructFields(BaseModel):
    criterion: str = Field("delta", pattern=r"^[a-z_]{1,32}$")
    k: int | None = Field(None, ge=1, le=65536, description="directions to damp (default 32 when no percentile)")
    percentile: float | None = Field(None, ge=0, lt=1, description="paper's p: k = ceil(d·(1 − p))")
    alpha: float | list[float] = Field(0.5, description="scale of each chosen σ: one value or k values")

    @field_validator("alpha")
    @classmethod
    def _finite(cls, alpha: float | list[float]) -> float | list[float]:
        values = alpha if isinstance(alpha, list) else [alpha]
        if not values or not all(math.isfinite(a) and -100 <= a <= 100 for a in values):
            raise ValueError("alpha must be finite, within [-100, 100], and not an empty list")
        return alpha

    @model_validator(mode="after")
    def _k_or_percentile(self) -> ReconstructFields:
        if self.k is not None and self.percentile is not None:
            raise ValueError("give k or percentile, not both")
        if self.k is None and self.percentile is None:
            self.k = 32
        return self


class GenerateSpec(JobSpec):
    """Step 1: continuations of the prompts, with the state behind every token."""

    prompts: PromptSource
    rows: str | None = Field(None, pattern=r"^\d*:\d*$", description="half-open row range A:B of the source")


class ExtractSpec(ExtractFields):
    """Step 2: judge continuations and keep toxic / non-toxic states (from a generate job, or from prompts)."""

    prompts: PromptSource | None = None
    rows: str | None = Field(None, pattern=r"^\d*:\d*$")
    generate_job_id: str | None = Field(None, pattern=ID_PATTERN)

    @model_validator(mode="after")
    def _one_source(self) -> ExtractSpec:
        if (self.prompts is None) == (self.generate_job_id is None) and self.reference_csv is None:
            raise ValueError("give exactly one of prompts and generate_job_id (or only reference_csv)")
        if self.prompts is not None and self.generate_job_id is not None:
            raise ValueError("give prompts or generate_job_id, not both")
        return self


class ReconstructSpec(ExtractFields, ReconstructFields):
    """Step 3 from an extract job's states, or steps 1–3 from a prompt source."""

    extract_job_id: str | None = Field(None, pattern=ID_PATTERN)
    prompts: PromptSource | None = None
    rows: str | None = Field(None, pattern=r"^\d*:\d*$")

    @model_validator(mode="after")
    def _one_source(self) -> ReconstructSpec:
        if (self.extract_job_id is None) == (self.prompts is None and self.reference_csv is None):
            raise ValueError("give exactly one of extract_job_id and a prompt source")
        return self


class EvaluateSpec(ScoredSpec):
    """Step 4: toxicity before and after an intervention on (held-out) prompts."""

    prompts: PromptSource
    rows: str | None = Field(None, pattern=r"^\d*:\d*$")
    intervention_id: str = Field(..., pattern=ID_PATTERN)
    n_boot: int = Field(1000, ge=1, le=100_000)


class PipelineSpec(ExtractFields, ReconstructFields):
    """All four steps: build on train_rows, evaluate on disjoint eval_rows."""

    prompts: PromptSource
    train_rows: str = Field(..., pattern=r"^\d*:\d*$")
    eval_rows: str = Field(..., pattern=r"^\d*:\d*$")
    train_samples: int | None = Field(None, ge=1, le=1000)
    n_boot: int = Field(1000, ge=1, le=100_000)


SPECS: dict[str, type[JobSpec]] = {
    "generate": GenerateSpec, "extract": ExtractSpec, "reconstruct": ReconstructSpec,
    "evaluate": EvaluateSpec, "pipeline": PipelineSpec,
}


def steps_for(kind: str, spec: JobSpec) -> list[Step]:
    """The tasks a job runs, in order (a chain when more than one)."""
    if kind == "pipeline":
        return ["extract", "reconstruct", "evaluate"]
    if kind == "reconstruct" and isinstance(spec, ReconstructSpec) and spec.extract_job_id is None:
        return ["extract", "reconstruct"]
    return [kind]  # type: ignore[list-item]

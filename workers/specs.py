"""What each job kind is asked to do: validated bodies, stored in the job record and re-read by the worker.

Every default is the core config's (`eigenshift_core.configs`), so a job builds what the CLI builds. These
check what needs no settings (types, ranges, exactly-one rules, registry names, α against k);
`workers.job_service.JobService.check_spec` checks the rest (allowed models, data root, sizes) before
anything is written.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eigenshift_core.compare import BASELINE
from eigenshift_core.configs import (
    field_default,
)
from eigenshift_core.criteria import CRITERIA
from eigenshift_core.errors import unknown_name
from eigenshift_core.intervention import DEFAULT_K, check_alpha
from eigenshift_core.scoring import known_scorers

JobKind = Literal["generate", "extract", "reconstruct", "evaluate", "pipeline"]
Step = Literal["generate", "extract", "reconstruct", "evaluate"]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_COMPARED = 8  # interventions in one evaluate job's comparison


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


class TextSource(BaseModel):
    """A text file: uploaded (`file_id`) or a path under the data root."""

    model_config = ConfigDict(extra="forbid")

    file_id: str | None = Field(None, pattern=ID_PATTERN, description="id returned by POST /files")
    path: str | None = Field(None, min_length=1, max_length=1024, description="a file under the data root")

    @model_validator(mode="after")
    def _exactly_one(self) -> TextSource:
        if (self.file_id is None) == (self.path is None):
            raise ValueError("give exactly one of file_id and path")
        return self


class JobSpec(BaseModel):
    """Fields every job kind shares."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded", min_length=1, max_length=200, description="a model the service allows")
    seed: int = Field(field_default("seed"), ge=0, le=2**31 - 1)
    samples: int = Field(field_default("samples"), ge=1, le=1000, description="continuations per prompt")
    max_new_tokens: int = Field(field_default("max_new_tokens"), ge=1, le=1024)
    top_p: float = Field(field_default("top_p"), gt=0, le=1)
    temperature: float = Field(field_default("temperature"), gt=0, le=10)
    batch_size: int = Field(field_default("batch_size"), ge=1, le=1024)
    callback_url: str | None = Field(None, min_length=1, max_length=2048,
                                     description="POSTed the signed job record when the job ends (an allowed host)")


class ScoredSpec(JobSpec):
    scorer: str = Field(field_default("scorer"), min_length=1, max_length=300,
                        description="profanity, hf:<id>, detoxify:<ckpt>")
    threshold: float = Field(field_default("threshold"), ge=0, le=1)

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, scorer: str) -> str:
        return known_scorer(scorer, field="scorer")


def known_scorer(spec: str, *, field: str) -> str:
    """`spec` when its prefix names a registered scorer (loading it is the worker's business)."""
    prefix = spec.partition(":")[0]
    if prefix not in known_scorers():
        raise unknown_name("scorer", prefix, known_scorers(), field=field)
    return spec


class ExtractFields(ScoredSpec):
    top_words: int = Field(field_default("top_words"), ge=1, le=50)
    require_argmax: bool = Field(field_default("require_argmax"))
    max_nontoxic: int = Field(field_default("max_nontoxic"), ge=1, le=10_000_000)
    reference_csv: str | None = Field(None, min_length=1, max_length=1024,
                                      description="a step-2 CSV under the data root, teacher-forced into the states")


class ReconstructFields(BaseModel):
    criterion: str = Field(field_default("criterion"), min_length=1, max_length=64,
                           description=f"selection criterion: one of {', '.join(sorted(CRITERIA))}")
    k: int | None = Field(field_default("k"), ge=1, le=65536,
                          description="directions to damp (null and no percentile: 100, at most d)")
    percentile: float | None = Field(field_default("percentile"), ge=0, lt=1, description="paper's p: k = ceil(d·(1 − p))")
    alpha: float | list[float] | Literal["auto"] = Field(
        field_default("alpha"), validate_default=True,
        description="scale of each chosen σ: one value, k values, or 'auto' (the criterion's own)")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, criterion: str) -> str:
        if criterion not in CRITERIA:
            raise unknown_name("criterion", criterion, CRITERIA, field="criterion")
        return criterion

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, alpha: float | list[float] | str, info: ValidationInfo) -> float | list[float] | str:
        """Finite values; 'auto' only with a criterion that chooses α; a list of exactly k values."""
        if not isinstance(alpha, str):
            values = alpha if isinstance(alpha, list) else [alpha]
            if not values or not all(math.isfinite(a) and -100 <= a <= 100 for a in values):
                raise ValueError("alpha must be finite, within [-100, 100], and not an empty list")
        criterion, k, percentile = (info.data.get(name) for name in ("criterion", "k", "percentile"))
        if criterion is None:  # the criterion itself was refused: that error says enough
            return alpha
        if isinstance(alpha, list) and percentile is not None:
            raise ValueError("an alpha list needs k, not percentile (k is known only once d is)")
        check_alpha(alpha, criterion=criterion, k=k if k is not None else (DEFAULT_K if isinstance(alpha, list) else None))
        return alpha

    @model_validator(mode="after")
    def _k_or_percentile(self) -> ReconstructFields:
        if self.k is not None and self.percentile is not None:
            raise ValueError("give k or percentile, not both")
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


class FluencyFields(BaseModel):
    ppl_text: TextSource | None = Field(None, description="neutral text for perplexity (e.g. WikiText-2 test); "
                                        "null: the perplexity of the baseline's own continuations")
    ppl_window: int = Field(field_default("ppl_window"), ge=2, le=32768)
    ppl_stride: int = Field(field_default("ppl_stride"), ge=1, le=32768)
    ppl_max_tokens: int | None = Field(field_default("ppl_max_tokens"), ge=2, le=10_000_000)
    n_boot: int = Field(field_default("n_boot"), ge=1, le=100_000)


class SecondJudgeFields(BaseModel):
    second_scorer: str | None = Field(field_default("second_scorer"), min_length=1, max_length=300,
                                      description="a second judge of the evaluation, reported under `judges` "
                                      "beside `scorer` (which keeps the headline); null: none")

    @field_validator("second_scorer")
    @classmethod
    def _known_second_scorer(cls, scorer: str | None) -> str | None:
        return None if scorer is None else known_scorer(scorer, field="second_scorer")


class EvaluateSpec(ScoredSpec, SecondJudgeFields, FluencyFields):
    """Step 4: toxicity and fluency before and after an intervention (`intervention_id`), or of several side
    by side (`intervention_ids`), on (held-out) prompts."""

    prompts: PromptSource
    rows: str | None = Field(None, pattern=r"^\d*:\d*$")
    intervention_id: str | None = Field(None, pattern=ID_PATTERN, description="the intervention to evaluate "
                                        "(give this or intervention_ids)")
    intervention_ids: list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]] | None = Field(
        None, min_length=1, max_length=MAX_COMPARED, validate_default=True,
        description=f"1 to {MAX_COMPARED} interventions compared with one baseline on the same prompts and seeds "
                    "(evaluate/comparison.json and .png); one id is the same as intervention_id")
    reference_csv: str | None = Field(None, min_length=1, max_length=1024, description="a step-2 CSV under the "
                                      "data root: the held-out rows' toxic tokens, teacher-forced, before and after")

    @field_validator("intervention_ids")
    @classmethod
    def _one_or_several(cls, ids: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """Exactly one of intervention_id and intervention_ids; the ids unique, none named like the baseline."""
        if "intervention_id" not in info.data:  # intervention_id itself was refused: that error says enough
            return ids
        if (info.data["intervention_id"] is None) == (ids is None):
            raise ValueError("give exactly one of intervention_id and intervention_ids")
        if ids is not None and len(set(ids)) != len(ids):
            raise ValueError("intervention_ids must be unique")
        if ids is not None and BASELINE in ids:
            raise ValueError(f"{BASELINE!r} names the unedited model in a comparison: it cannot be compared")
        return ids

    def evaluated_ids(self) -> list[str]:
        """The ids of the interventions evaluated, in the order given."""
        return list(self.intervention_ids) if self.intervention_ids else [str(self.intervention_id)]


class PipelineSpec(ExtractFields, ReconstructFields, SecondJudgeFields, FluencyFields):
    """All four steps: build on train_rows, evaluate on disjoint eval_rows."""

    prompts: PromptSource
    train_rows: str = Field(..., pattern=r"^\d*:\d*$")
    eval_rows: str = Field(..., pattern=r"^\d*:\d*$")
    train_samples: int | None = Field(field_default("train_samples"), ge=0, le=1000,
                                      description="samples per training prompt (null: samples; 0: reference_csv only)")


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

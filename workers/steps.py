"""The four steps as a job runs them: fetch the inputs, call the core's step function, keep what it wrote.

Each step builds the core's own config from the job's spec (`config_from`; a pipeline job through the
same `extract_config` / `reconstruct_config` / `evaluate_config` as `run_pipeline`), so a job builds
exactly what the CLI builds. The runner uploads `ctx.out` afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eigenshift_core.configs import (
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    PipelineConfig,
    ReconstructConfig,
    config_from,
)
from eigenshift_core.pipeline import evaluate_config, extract_config, reconstruct_config, reconstruct_info
from eigenshift_core.steps import run_evaluate, run_extract, run_generate, run_reconstruct
from workers.interventions import report_summary
from workers.runner import StepContext, StepResult
from workers.sources import data_path, materialize, text_path
from workers.specs import EvaluateSpec, ExtractSpec, GenerateSpec, PipelineSpec, ReconstructSpec

CONTINUATION_FILES = ("continuations.safetensors", "continuations.jsonl")


def _prompts(ctx: StepContext) -> Path:
    source = getattr(ctx.spec, "prompts", None)
    assert source is not None
    return materialize(source, ctx.settings, ctx.store, ctx.scratch)


def _reference(ctx: StepContext) -> Path | None:
    name = getattr(ctx.spec, "reference_csv", None)
    return data_path(ctx.settings, name, field="reference_csv") if name else None


def pipeline_config(ctx: StepContext) -> PipelineConfig:
    """The pipeline job's spec as the core's config, with its files made local."""
    spec = ctx.spec
    assert isinstance(spec, PipelineSpec)
    ppl_text = text_path(spec.ppl_text, ctx.settings, ctx.store, ctx.scratch, field="ppl_text") if spec.ppl_text else None
    return config_from(PipelineConfig, spec, prompts=_prompts(ctx), reference_csv=_reference(ctx), ppl_text=ppl_text)


def generate(ctx: StepContext) -> StepResult:
    """Step 1: continuations and their states."""
    assert isinstance(ctx.spec, GenerateSpec)
    run_generate(ctx.lm(), config_from(GenerateConfig, ctx.spec, prompts=_prompts(ctx)), ctx.out, ctx.hooks())
    return StepResult()


def extract(ctx: StepContext) -> StepResult:
    """Step 2 (with step 1 when given prompts): toxic and non-toxic states."""
    spec = ctx.spec
    if isinstance(spec, PipelineSpec):
        config = extract_config(pipeline_config(ctx))
    else:
        assert isinstance(spec, ExtractSpec | ReconstructSpec)
        generations = None
        if getattr(spec, "generate_job_id", None):
            for name in CONTINUATION_FILES:
                ctx.fetch(f"jobs/{spec.generate_job_id}/generate/{name}", name)  # type: ignore[union-attr]
            generations = ctx.scratch
        prompts = _prompts(ctx) if spec.prompts is not None else None
        config = config_from(ExtractConfig, spec, prompts=prompts, generations=generations,
                             reference_csv=_reference(ctx))
    run_extract(ctx.lm(), config, ctx.out, ctx.hooks())
    return StepResult()


def reconstruct(ctx: StepContext) -> StepResult:
    """Step 3: the intervention, registered under the job's id."""
    spec = ctx.spec
    assert isinstance(spec, ReconstructSpec | PipelineSpec)
    source = getattr(spec, "extract_job_id", None) or ctx.job_id
    states = ctx.fetch(f"jobs/{source}/extract/states.safetensors", "states.safetensors")
    info: dict[str, Any] = {"job_id": ctx.job_id, "extract_job_id": source}
    if isinstance(spec, PipelineSpec):
        pipeline = pipeline_config(ctx)
        config = reconstruct_config(pipeline, states)
        info.update(reconstruct_info(pipeline, spec.scorer))
    else:
        config = config_from(ReconstructConfig, spec, states=states)
        info["scorer"] = spec.scorer
    run_reconstruct(ctx.lm(), config, ctx.out, info=info)
    ctx.interventions.register(ctx.job_id, ctx.out, model=spec.model, job_id=ctx.job_id, owner=ctx.record.owner)
    ctx.hooks().report("reconstruct", 1, 1, "steps")
    return StepResult(intervention_id=ctx.job_id)


def evaluate(ctx: StepContext) -> StepResult:
    """Step 4: baseline and intervention on held-out prompts, as report.json and report.png, and the
    intervention keeps the report's headline figures; several interventions (named by their ids) side by
    side as comparison.json and comparison.png."""
    spec = ctx.spec
    assert isinstance(spec, EvaluateSpec | PipelineSpec)
    if isinstance(spec, EvaluateSpec):
        ids = spec.evaluated_ids()
    else:  # a pipeline evaluates what its reconstruct step built
        built = ctx.jobs.get(ctx.job_id).intervention_id
        assert built is not None
        ids = [built]
    cache = ctx.settings.data_dir / "cache" / "interventions"
    directories = {i: ctx.interventions.fetch(i, cache) for i in ids}
    if isinstance(spec, PipelineSpec):
        config = evaluate_config(pipeline_config(ctx), directories[ids[0]])
    else:
        ppl_text = text_path(spec.ppl_text, ctx.settings, ctx.store, ctx.scratch, field="ppl_text") if spec.ppl_text else None
        config = config_from(EvaluateConfig, spec, prompts=_prompts(ctx), interventions=directories,
                             reference_csv=_reference(ctx), ppl_text=ppl_text)
    result = run_evaluate(ctx.lm(), config, ctx.out, ctx.hooks())
    if len(directories) == 1:  # a comparison's figures are the job's, not one intervention's headline
        ctx.interventions.set_metrics(ids[0], report_summary(result.report, ctx.job_id))
    return StepResult()


STEPS = {"generate": generate, "extract": extract, "reconstruct": reconstruct, "evaluate": evaluate}

"""The four steps as the tasks run them: read the spec, call the core once, write into `ctx.out`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eigenshift_core.evaluation import evaluate as evaluate_intervention
from eigenshift_core.evaluation import write_report
from eigenshift_core.extraction import extract_states, import_reference_csv
from eigenshift_core.generation import Continuations, generate_continuations
from eigenshift_core.intervention import Intervention, build_intervention
from eigenshift_core.pipeline import PipelineConfig, build_states
from eigenshift_core.prompts import PromptSet, load_prompts
from eigenshift_core.scoring import load_scorer
from eigenshift_core.states import StateSet
from workers.runner import StepContext, StepResult
from workers.sources import data_path, materialize
from workers.specs import EvaluateSpec, ExtractSpec, GenerateSpec, PipelineSpec, ReconstructSpec


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _prompts(ctx: StepContext, rows: str | None) -> PromptSet:
    source = getattr(ctx.spec, "prompts", None)
    assert source is not None
    return load_prompts(materialize(source, ctx.settings, ctx.store, ctx.scratch), rows)


def _reference(ctx: StepContext) -> Path | None:
    name = getattr(ctx.spec, "reference_csv", None)
    return data_path(ctx.settings, name, field="reference_csv") if name else None


def generate(ctx: StepContext) -> StepResult:
    """Step 1: continuations and their states."""
    spec = ctx.spec
    assert isinstance(spec, GenerateSpec)
    prompts = _prompts(ctx, spec.rows)
    ctx.progress("generate", 0, len(prompts.records))
    result = generate_continuations(
        ctx.lm(), prompts.texts, samples=spec.samples, max_new_tokens=spec.max_new_tokens, do_sample=True,
        top_p=spec.top_p, temperature=spec.temperature, seed=spec.seed, batch_size=spec.batch_size,
    )
    result.save(ctx.out)
    _write_json(ctx.out / "generate.json", {"model": spec.model, "prompts": prompts.describe(),
                                            **spec.model_dump(exclude={"prompts"})})
    ctx.progress("generate", len(prompts.records), len(prompts.records))
    return StepResult()


def extract(ctx: StepContext) -> StepResult:
    """Step 2 (with step 1 when given prompts): toxic and non-toxic states."""
    spec = ctx.spec
    assert isinstance(spec, ExtractSpec | ReconstructSpec | PipelineSpec)
    rows = spec.train_rows if isinstance(spec, PipelineSpec) else spec.rows
    lm, reference = ctx.lm(), _reference(ctx)
    generate_job = getattr(spec, "generate_job_id", None)
    if generate_job:
        names = ("continuations.safetensors", "continuations.jsonl")
        for name in names:
            ctx.fetch(f"jobs/{generate_job}/generate/{name}", name)
        scorer = load_scorer(spec.scorer, device=str(lm.device))
        states, judgements = extract_states(lm, Continuations.load(ctx.scratch), scorer, threshold=spec.threshold,
                                            top_words=spec.top_words, max_nontoxic=spec.max_nontoxic, seed=spec.seed)
        (ctx.out / "judgements.jsonl").write_text("".join(json.dumps(j.to_dict()) + "\n" for j in judgements))
    elif spec.prompts is not None:
        train = _prompts(ctx, rows)
        config = _config(spec, Path(train.source), rows or "", reference)
        scorer = load_scorer(spec.scorer, device=str(lm.device))
        states = build_states(lm, train, scorer, config, ctx.out, on_progress=ctx.progress,
                              should_stop=ctx.should_stop)
        return StepResult()
    else:
        assert reference is not None
        states, _ = import_reference_csv(lm, reference, rows=rows, max_nontoxic=spec.max_nontoxic,
                                         batch_size=spec.batch_size, seed=spec.seed)
    states.save(ctx.out / "states.safetensors")
    _write_json(ctx.out / "extract.json", {"counts": states.counts(), **states.info})
    states.require_both()
    return StepResult()


def _config(spec: ExtractSpec | ReconstructSpec | PipelineSpec, prompts: Path, rows: str,
            reference: Path | None) -> PipelineConfig:
    train_samples = getattr(spec, "train_samples", None) or spec.samples
    return PipelineConfig(
        model=spec.model, prompts=prompts, train_rows=rows, eval_rows=getattr(spec, "eval_rows", ""),
        scorer=spec.scorer, threshold=spec.threshold, samples=spec.samples, train_samples=train_samples,
        max_new_tokens=spec.max_new_tokens, top_p=spec.top_p, temperature=spec.temperature, seed=spec.seed,
        batch_size=spec.batch_size, top_words=spec.top_words, max_nontoxic=spec.max_nontoxic,
        reference_csv=reference,
    )


def reconstruct(ctx: StepContext) -> StepResult:
    """Step 3: the intervention, registered under the job's id."""
    spec = ctx.spec
    assert isinstance(spec, ReconstructSpec | PipelineSpec)
    source = getattr(spec, "extract_job_id", None) or ctx.job_id
    states = StateSet.load(ctx.fetch(f"jobs/{source}/extract/states.safetensors", "states.safetensors"))
    lm = ctx.lm()
    intervention = build_intervention(
        lm.model, states, criterion=spec.criterion, k=spec.k, percentile=spec.percentile, alpha=spec.alpha,
        info={"model_id": spec.model, "revision": lm.revision, "scorer": spec.scorer, "job_id": ctx.job_id,
              "extract_job_id": source},
    )
    intervention.save(ctx.out)
    ctx.interventions.register(ctx.job_id, ctx.out, model=spec.model, job_id=ctx.job_id)
    ctx.progress("reconstruct", 1, 1)
    return StepResult(intervention_id=ctx.job_id)


def evaluate(ctx: StepContext) -> StepResult:
    """Step 4: baseline and intervention on held-out prompts, as report.json and report.png."""
    spec = ctx.spec
    assert isinstance(spec, EvaluateSpec | PipelineSpec)
    rows = spec.eval_rows if isinstance(spec, PipelineSpec) else spec.rows
    intervention_id = spec.intervention_id if isinstance(spec, EvaluateSpec) else ctx.jobs.get(ctx.job_id).intervention_id
    assert intervention_id is not None
    lm = ctx.lm()
    directory = ctx.interventions.fetch(intervention_id, ctx.settings.data_dir / "cache" / "interventions")
    intervention = Intervention.load(directory, lm.model)
    held_out = _prompts(ctx, rows)
    reference = _reference(ctx)
    heldout_states = None
    if reference is not None:
        heldout_states, _ = import_reference_csv(lm, reference, rows=held_out.rows, max_nontoxic=20_000,
                                                 batch_size=spec.batch_size, seed=spec.seed)
    scorer = load_scorer(spec.scorer, device=str(lm.device))
    ctx.progress("evaluate", 0, len(held_out.records))
    report = evaluate_intervention(
        lm, held_out.texts, scorer, intervention, samples=spec.samples, max_new_tokens=spec.max_new_tokens,
        top_p=spec.top_p, temperature=spec.temperature, seed=spec.seed, batch_size=spec.batch_size,
        threshold=spec.threshold, heldout=heldout_states, n_boot=spec.n_boot,
    )
    report.update({"model": spec.model, "scorer": scorer.name, "seed": spec.seed,
                   "eval_prompts": held_out.describe(), "intervention": intervention.info})
    write_report(report, ctx.out, intervention)
    if isinstance(spec, PipelineSpec):
        ctx.interventions.set_metrics(intervention_id, summary(report))
    ctx.progress("evaluate", len(held_out.records), len(held_out.records))
    return StepResult()


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a report, kept with the intervention."""
    return {key: report.get(key) for key in ("baseline", "intervention", "toxicity_reduction", "tph")}


STEPS = {"generate": generate, "extract": extract, "reconstruct": reconstruct, "evaluate": evaluate}

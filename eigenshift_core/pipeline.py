"""The four steps end to end: build on train rows, evaluate on the disjoint eval rows.

`run_pipeline` only composes the step functions of `steps.py`; the configs it hands them come from
`extract_config`, `reconstruct_config` and `evaluate_config`, which a worker running a pipeline job one
step at a time calls too, so both build exactly the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eigenshift_core.configs import (
    EvaluateConfig,
    ExtractConfig,
    PipelineConfig,
    ReconstructConfig,
    config_from,
)
from eigenshift_core.errors import InputError
from eigenshift_core.loading import LoadedModel
from eigenshift_core.progress import NO_HOOKS, StepHooks
from eigenshift_core.prompts import load_prompts, require_disjoint
from eigenshift_core.scoring import load_scorer
from eigenshift_core.steps import (
    EvaluateResult,
    ExtractResult,
    ReconstructResult,
    load_second_scorer,
    read_ppl_text,
    run_evaluate,
    run_extract,
    run_reconstruct,
    write_json,
)

STEP_DIRS = ("extract", "intervention", "evaluate")


@dataclass(frozen=True)
class PipelineResult:
    out: Path
    extract: ExtractResult
    reconstruct: ReconstructResult
    evaluate: EvaluateResult


def check_pipeline(config: PipelineConfig) -> None:
    """What can be checked before any model work: rows, disjointness, the training source."""
    train_samples = config.samples if config.train_samples is None else config.train_samples
    if train_samples < 0:
        raise InputError(f"train_samples must not be negative, got {train_samples}", field="train_samples")
    if train_samples == 0 and config.reference_csv is None:
        raise InputError("train_samples 0 needs a reference CSV to take the training states from", field="train_samples")
    require_disjoint(load_prompts(config.prompts, config.train_rows), load_prompts(config.prompts, config.eval_rows))
    read_ppl_text(config.ppl_text)


def extract_config(config: PipelineConfig) -> ExtractConfig:
    """Step 2 of a pipeline: the train rows, generated `train_samples` times (0: the reference CSV only)."""
    train_samples = config.samples if config.train_samples is None else config.train_samples
    return config_from(ExtractConfig, config, prompts=config.prompts if train_samples > 0 else None,
                       rows=config.train_rows, samples=max(train_samples, 1), generations=None)


def reconstruct_config(config: PipelineConfig, states: Path) -> ReconstructConfig:
    return config_from(ReconstructConfig, config, states=states)


def reconstruct_info(config: PipelineConfig, scorer: str) -> dict[str, Any]:
    """Provenance a pipeline adds to its intervention: where its states came from, what it is evaluated on."""
    train_samples = config.samples if config.train_samples is None else config.train_samples
    return {"scorer": scorer, "prompt_source": str(config.prompts), "train_rows": config.train_rows,
            "eval_rows": config.eval_rows, "train_samples": train_samples,
            "reference_csv": str(config.reference_csv) if config.reference_csv else None}


def evaluate_config(config: PipelineConfig, intervention: Path) -> EvaluateConfig:
    return config_from(EvaluateConfig, config, rows=config.eval_rows, intervention=intervention)


def run_pipeline(lm: LoadedModel, config: PipelineConfig, out: Path, hooks: StepHooks = NO_HOOKS) -> PipelineResult:
    """generate → extract (train rows) → reconstruct → evaluate (eval rows), into out/{extract,
    intervention,evaluate}; `pipeline.json` records the config."""
    check_pipeline(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pipeline.json", asdict(config))
    scorer = load_scorer(config.scorer, device=str(lm.device))
    load_second_scorer(config.second_scorer, device=str(lm.device))  # fail before any work; cached for step 4
    extracted = run_extract(lm, extract_config(config), out / "extract", hooks, scorer=scorer)
    hooks.check("reconstruct")
    built = run_reconstruct(lm, reconstruct_config(config, out / "extract" / "states.safetensors"),
                            out / "intervention", info=reconstruct_info(config, scorer.name))
    hooks.report("reconstruct", 1, 1, "steps")
    evaluated = run_evaluate(lm, evaluate_config(config, out / "intervention"), out / "evaluate", hooks, scorer=scorer)
    return PipelineResult(out, extracted, built, evaluated)

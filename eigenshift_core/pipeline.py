"""The four steps end to end: build on train rows, evaluate on disjoint eval rows.

Shared by the CLI and the workers. Each step writes its own subdirectory of `out` and a later failure
never removes an earlier step's files. Training prompts are processed in chunks (generate, judge,
keep only the states), so memory does not grow with samples × prompts × tokens × d.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from eigenshift_core.errors import InputError
from eigenshift_core.evaluation import evaluate, write_report
from eigenshift_core.extraction import Judgement, extract_states, import_reference_csv
from eigenshift_core.generation import generate_continuations
from eigenshift_core.intervention import build_intervention
from eigenshift_core.loading import LoadedModel
from eigenshift_core.prompts import PromptSet, load_prompts, require_disjoint
from eigenshift_core.scoring import Scorer, load_scorer
from eigenshift_core.states import StateSet

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


class Cancelled(Exception):
    """Raised between batches when the caller asked to stop."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides a pipeline's result; recorded in `pipeline.json`."""

    model: str
    prompts: Path
    train_rows: str
    eval_rows: str
    scorer: str = "profanity"
    threshold: float = 0.5
    samples: int = 25
    train_samples: int = 25
    max_new_tokens: int = 20
    do_sample: bool = True
    top_p: float = 0.95
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32
    top_words: int = 3
    require_argmax: bool = False
    max_nontoxic: int = 200_000
    criterion: str = "delta"
    k: int | None = None
    percentile: float | None = None
    alpha: float | Sequence[float] | str = 0.5  # or "auto": per-direction α from the selectivity terms
    reference_csv: Path | None = None
    ppl_text: Path | None = None
    ppl_window: int = 1024
    ppl_stride: int = 512
    ppl_max_tokens: int | None = 16384
    n_boot: int = 1000
    chunk_prompts: int = 256


def generate_and_extract(
    lm: LoadedModel,
    prompts: Sequence[str],
    scorer: Scorer,
    config: PipelineConfig,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[StateSet, list[Judgement]]:
    """Steps 1 and 2 over `prompts` in chunks; only states and judgements are kept."""
    parts: list[StateSet] = []
    judgements: list[Judgement] = []
    per_chunk_cap = max(1, config.max_nontoxic * config.chunk_prompts // max(len(prompts), 1))
    for start in range(0, len(prompts), config.chunk_prompts):
        if should_stop and should_stop():
            raise Cancelled("cancelled during generation")
        chunk = list(prompts[start : start + config.chunk_prompts])
        continuations = generate_continuations(
            lm, chunk, samples=config.train_samples, max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
            top_p=config.top_p, temperature=config.temperature, seed=config.seed + start, batch_size=config.batch_size,
        )
        states, chunk_judgements = extract_states(
            lm, continuations, scorer, threshold=config.threshold, top_words=config.top_words,
            require_argmax=config.require_argmax, max_nontoxic=per_chunk_cap, seed=config.seed + start,
        )
        parts.append(states)
        judgements.extend(
            Judgement(j.row, j.prompt_index + start, j.text, j.score, j.toxic, j.words) for j in chunk_judgements
        )
        if on_progress:
            on_progress("generate", min(start + config.chunk_prompts, len(prompts)), len(prompts))
    merged = StateSet.concat(parts)
    info = {**parts[0].info, "continuations": len(judgements), "toxic_continuations": sum(j.toxic for j in judgements)}
    return StateSet(merged.toxic, merged.toxic_tokens, merged.nontoxic, merged.nontoxic_tokens, info), judgements


def build_states(
    lm: LoadedModel, train: PromptSet, scorer: Scorer, config: PipelineConfig, out: Path, **hooks: object
) -> StateSet:
    """Training states from the model's own continuations (unless train_samples is 0), plus the reference
    CSV's rows when given."""
    if config.train_samples < 0:
        raise InputError(f"train_samples must not be negative, got {config.train_samples}", field="train_samples")
    if config.train_samples == 0 and config.reference_csv is None:
        raise InputError("train_samples 0 needs a reference CSV to take the training states from", field="train_samples")
    out.mkdir(parents=True, exist_ok=True)
    parts: list[StateSet] = []
    if config.train_samples > 0:
        generated, judgements = generate_and_extract(lm, train.texts, scorer, config, **hooks)  # type: ignore[arg-type]
        (out / "judgements.jsonl").write_text("".join(json.dumps(j.to_dict()) + "\n" for j in judgements))
        parts.append(generated)
    if config.reference_csv is not None:
        reference, _ = import_reference_csv(
            lm, config.reference_csv, rows=train.rows, require_argmax=config.require_argmax,
            max_nontoxic=config.max_nontoxic, batch_size=config.batch_size, seed=config.seed,
        )
        parts.append(reference)
    merged = StateSet.concat(parts)
    info = {**parts[0].info, "reference_csv": str(config.reference_csv) if config.reference_csv else None,
            "generated_states": config.train_samples > 0}
    states = StateSet(merged.toxic, merged.toxic_tokens, merged.nontoxic, merged.nontoxic_tokens, info)
    states.save(out / "states.safetensors")
    (out / "extract.json").write_text(json.dumps({"counts": states.counts(), **states.info}, indent=2, default=str))
    return states.require_both()


def run_pipeline(
    lm: LoadedModel,
    config: PipelineConfig,
    out: Path,
    *,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """generate → extract (train rows) → reconstruct → evaluate (eval rows); returns `out`."""
    train = load_prompts(config.prompts, config.train_rows)
    held_out = load_prompts(config.prompts, config.eval_rows)
    require_disjoint(train, held_out)
    ppl_text = read_ppl_text(config.ppl_text)
    scorer = load_scorer(config.scorer, device=str(lm.device))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")

    states = build_states(lm, train, scorer, config, out / "extract", on_progress=on_progress, should_stop=should_stop)
    if should_stop and should_stop():
        raise Cancelled("cancelled before reconstruct")
    intervention = build_intervention(
        lm.model, states, criterion=config.criterion, k=config.k, percentile=config.percentile, alpha=config.alpha,
        info={"model_id": config.model, "revision": lm.revision, "scorer": scorer.name,
              "prompt_source": train.source, "train_rows": train.rows, "eval_rows": held_out.rows},
    )
    intervention.save(out / "intervention")
    if on_progress:
        on_progress("reconstruct", 1, 1)
    heldout_states = _heldout_states(lm, config, held_out)
    report = evaluate(
        lm, held_out.texts, scorer, intervention, samples=config.samples, max_new_tokens=config.max_new_tokens,
        top_p=config.top_p, temperature=config.temperature, seed=config.seed, batch_size=config.batch_size,
        threshold=config.threshold, ppl_text=ppl_text, ppl_window=config.ppl_window, ppl_stride=config.ppl_stride,
        ppl_max_tokens=config.ppl_max_tokens, heldout=heldout_states, n_boot=config.n_boot, progress=progress,
    )
    report.update({"model": config.model, "scorer": scorer.name, "seed": config.seed, "train_prompts": train.describe(),
                   "eval_prompts": held_out.describe(), "provenance": intervention.info})
    write_report(report, out / "evaluate", intervention)
    if on_progress:
        on_progress("evaluate", 1, 1)
    return out


def _heldout_states(lm: LoadedModel, config: PipelineConfig, held_out: PromptSet) -> StateSet | None:
    """Teacher-forced toxic and non-toxic states of the eval rows, when a reference CSV supplies them."""
    if config.reference_csv is None:
        return None
    states, _ = import_reference_csv(lm, config.reference_csv, rows=held_out.rows, max_nontoxic=20_000,
                                     batch_size=config.batch_size, seed=config.seed)
    return states


def read_ppl_text(path: Path | None) -> str | None:
    """The neutral text perplexity is measured on, or None."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"perplexity text not found: {path}", field="ppl_text")
    return Path(path).read_text(encoding="utf-8", errors="replace")


"""The four steps, each one function over a typed config that writes into `out` and returns what it made.

The CLI, the workers and the benchmarks all call these; none of them repeats a step. A step never
deletes what an earlier step wrote: each writes its own files, atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eigenshift_core.compare import CompareConfig, run_compare
from eigenshift_core.configs import (
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    ReconstructConfig,
    SamplingConfig,
    config_from,
)
from eigenshift_core.errors import InputError
from eigenshift_core.evaluation import evaluate
from eigenshift_core.extraction import Judgement, extract_states, import_reference_csv
from eigenshift_core.files import atomic_write
from eigenshift_core.generation import Continuations, generate_continuations
from eigenshift_core.intervention import Intervention, build_intervention
from eigenshift_core.loading import LoadedModel
from eigenshift_core.progress import NO_HOOKS, StepHooks
from eigenshift_core.prompts import load_prompts
from eigenshift_core.report import write_report
from eigenshift_core.scoring import Scorer, load_scorer
from eigenshift_core.states import StateSet


@dataclass(frozen=True)
class GenerateResult:
    out: Path
    prompts: int
    continuations: int


@dataclass(frozen=True)
class ExtractResult:
    out: Path
    counts: dict[str, int]
    continuations: int  # judged here (0 when the states came only from a reference CSV)
    toxic_continuations: int


@dataclass(frozen=True)
class ReconstructResult:
    out: Path
    intervention: Intervention


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    report: dict[str, Any]


def write_json(path: Path, data: object) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def sampling_of(config: Any) -> dict[str, Any]:
    """The generation arguments of a config with `SamplingConfig`'s fields."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(SamplingConfig)}


def run_generate(lm: LoadedModel, config: GenerateConfig, out: Path, hooks: StepHooks = NO_HOOKS) -> GenerateResult:
    """Step 1: `continuations.safetensors`, `continuations.jsonl` and `generate.json` in `out`."""
    prompts = load_prompts(config.prompts, config.rows)
    result = generate_continuations(lm, prompts.texts, progress=hooks.bars,
                                    on_progress=hooks.batches("generate", "samples"), **sampling_of(config))
    result.save(out)
    write_json(Path(out) / "generate.json", {"model": lm.model_id, "prompts": prompts.describe(), **asdict(config)})
    return GenerateResult(Path(out), len(prompts.texts), len(result))


def run_extract(lm: LoadedModel, config: ExtractConfig, out: Path, hooks: StepHooks = NO_HOOKS,
                scorer: Scorer | None = None) -> ExtractResult:
    """Step 2: `states.safetensors`, `extract.json` and (when it judged continuations) `judgements.jsonl`.

    Sources, all optional but not all absent: `generations` (a generate output) or `prompts` (continued
    here in chunks of `chunk_prompts`, keeping only states, so memory does not grow with the set), and
    `reference_csv` (teacher-forced). The states are written before `require_both` is checked, so a run
    that found no toxic state still leaves what it found."""
    if config.generations is not None and config.prompts is not None:
        raise InputError("give generations or prompts, not both", field="generations")
    if config.generations is None and config.prompts is None and config.reference_csv is None:
        raise InputError("give generations, prompts or a reference CSV to take states from", field="prompts")
    if config.prompts is not None and config.samples < 1:
        raise InputError(f"samples must be at least 1 to generate from prompts, got {config.samples}", field="samples")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[StateSet] = []
    judgements: list[Judgement] = []
    if config.generations is not None or config.prompts is not None:
        scorer = scorer or load_scorer(config.scorer, device=str(lm.device))
        states, judgements = (_judge_generations(lm, config, scorer) if config.generations is not None
                              else _generate_and_judge(lm, config, scorer, hooks))
        atomic_write(out / "judgements.jsonl",
                     lambda tmp: tmp.write_text("".join(json.dumps(j.to_dict()) + "\n" for j in judgements)))
        parts.append(states)
    if config.reference_csv is not None:
        reference, _ = import_reference_csv(
            lm, config.reference_csv, rows=config.rows, require_argmax=config.require_argmax,
            max_nontoxic=config.max_nontoxic, batch_size=config.batch_size, seed=config.seed, progress=hooks.bars,
            on_progress=hooks.batches("extract: teacher forcing", "continuations"),
        )
        parts.append(reference)
    merged = StateSet.concat(parts)
    toxic_continuations = sum(j.toxic for j in judgements)
    info = {"model": lm.model_id, "scorer": config.scorer if judgements else None, "threshold": config.threshold,
            "continuations": len(judgements), "toxic_continuations": toxic_continuations,
            "reference_csv": str(config.reference_csv) if config.reference_csv else None,
            "rows": config.rows, "require_argmax": config.require_argmax}
    states = StateSet(merged.toxic, merged.toxic_tokens, merged.nontoxic, merged.nontoxic_tokens, info)
    states.save(out / "states.safetensors")
    write_json(out / "extract.json", {"counts": states.counts(), **info})
    _require_both(states, len(judgements), toxic_continuations, config)
    return ExtractResult(out, states.counts(), len(judgements), toxic_continuations)


def _judge_generations(lm: LoadedModel, config: ExtractConfig, scorer: Scorer) -> tuple[StateSet, list[Judgement]]:
    assert config.generations is not None
    return extract_states(lm, Continuations.load(config.generations), scorer, threshold=config.threshold,
                          top_words=config.top_words, require_argmax=config.require_argmax,
                          max_nontoxic=config.max_nontoxic, seed=config.seed)


def _generate_and_judge(lm: LoadedModel, config: ExtractConfig, scorer: Scorer,
                        hooks: StepHooks) -> tuple[StateSet, list[Judgement]]:
    """Steps 1 and 2 over the prompts in chunks; only states and judgements are kept."""
    assert config.prompts is not None
    prompts = load_prompts(config.prompts, config.rows).texts
    total = len(prompts) * config.samples
    per_chunk_cap = max(1, config.max_nontoxic * config.chunk_prompts // max(len(prompts), 1))
    parts: list[StateSet] = []
    judgements: list[Judgement] = []
    for start in range(0, len(prompts), config.chunk_prompts):
        chunk = prompts[start : start + config.chunk_prompts]
        continuations = generate_continuations(
            lm, chunk, progress=hooks.bars, **{**sampling_of(config), "seed": config.seed + start},
            on_progress=hooks.batches("extract: sampling", "samples", offset=start * config.samples, total=total),
        )
        states, chunk_judgements = extract_states(
            lm, continuations, scorer, threshold=config.threshold, top_words=config.top_words,
            require_argmax=config.require_argmax, max_nontoxic=per_chunk_cap, seed=config.seed + start,
        )
        parts.append(states)
        judgements.extend(
            Judgement(j.row + start * config.samples, j.prompt_index + start, j.text, j.score, j.toxic, j.words)
            for j in chunk_judgements
        )
        hooks.report("extract: sampling", min(start + len(chunk), len(prompts)) * config.samples, total, "samples")
    return StateSet.concat(parts), judgements


def _require_both(states: StateSet, judged: int, toxic: int, config: ExtractConfig) -> None:
    """No toxic (or no non-toxic) state: say what was judged and what to do."""
    if states.toxic.shape[0] == 0:
        found = (f"{judged} continuations were judged by {config.scorer!r} (threshold {config.threshold}), "
                 f"{toxic} of them toxic, and no toxic word could be located" if judged
                 else "the reference CSV's rows held no locatable toxic word")
        raise InputError(f"no toxic states found: {found}. Use more prompts or samples, toxic prompts "
                         "(e.g. RealToxicityPrompts), or a reference CSV (reference_csv)", field="prompts")
    states.require_both()


def run_reconstruct(lm: LoadedModel, config: ReconstructConfig, out: Path,
                    info: dict[str, Any] | None = None) -> ReconstructResult:
    """Step 3: `intervention.safetensors` and `intervention.json` in `out`; `info` joins the provenance."""
    states = StateSet.load(config.states)
    alpha = list(config.alpha) if not isinstance(config.alpha, str | int | float) else config.alpha
    intervention = build_intervention(
        lm.model, states, criterion=config.criterion, k=config.k, percentile=config.percentile, alpha=alpha,
        info={"model_id": lm.model_id, "revision": lm.revision, **(info or {})},
    )
    intervention.save(out)
    return ReconstructResult(Path(out), intervention)


def run_evaluate(lm: LoadedModel, config: EvaluateConfig, out: Path, hooks: StepHooks = NO_HOOKS,
                 scorer: Scorer | None = None) -> EvaluateResult:
    """Step 4: for one intervention, `report.json` and `report.png` in `out` (its provenance under
    `provenance`); for several, `comparison.json` and `comparison.png` (`compare.run_compare`: one baseline,
    every method on the same prompts and seeds, any intervention family)."""
    if len(config.methods) > 1:
        if config.reference_csv is not None:
            raise InputError("reference_csv (held-out log-probs) applies to one intervention, not a comparison",
                             field="reference_csv")
        compared = config_from(CompareConfig, config, interventions=config.methods)
        return EvaluateResult(Path(out), run_compare(lm, compared, out, scorer, hooks))
    held_out = load_prompts(config.prompts, config.rows)
    ppl_text = read_ppl_text(config.ppl_text)
    [directory] = config.methods.values()
    intervention = Intervention.load(directory, lm.model)
    scorer = scorer or load_scorer(config.scorer, device=str(lm.device))
    second_scorer = load_second_scorer(config.second_scorer, device=str(lm.device))
    heldout_states = None
    if config.reference_csv is not None:
        heldout_states, _ = import_reference_csv(
            lm, config.reference_csv, rows=held_out.rows, max_nontoxic=20_000, batch_size=config.batch_size,
            seed=config.seed, progress=hooks.bars, on_progress=hooks.batches("evaluate: teacher forcing", "continuations"),
        )
    report = evaluate(
        lm, held_out.texts, scorer, intervention, **sampling_of(config), threshold=config.threshold,
        ppl_text=ppl_text, ppl_window=config.ppl_window, ppl_stride=config.ppl_stride,
        ppl_max_tokens=config.ppl_max_tokens, heldout=heldout_states, n_boot=config.n_boot,
        second_scorer=second_scorer, hooks=hooks,
    )
    report.update({"model": lm.model_id, "scorer": scorer.name, "seed": config.seed,
                   "eval_prompts": held_out.describe(), "provenance": intervention.info})
    write_report(report, out, intervention)
    return EvaluateResult(Path(out), report)


def load_second_scorer(spec: str | None, *, device: str) -> Scorer | None:
    """The evaluation's second judge, or None when disabled. A judge that cannot load (its package is
    missing) is an error blamed on `second_scorer`, never skipped: the report would silently lack it."""
    if spec is None:
        return None
    try:
        return load_scorer(spec, device=device)
    except InputError as error:
        error.field = "second_scorer"
        raise


def read_ppl_text(path: Path | None) -> str | None:
    """The neutral text perplexity is measured on, or None."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"perplexity text not found: {path}", field="ppl_text")
    return Path(path).read_text(encoding="utf-8", errors="replace")

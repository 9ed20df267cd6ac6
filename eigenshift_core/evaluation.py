"""Step 4, evaluate: toxicity of sampled continuations before and after, fluency, and their balance.

Both arms continue the same prompts with the same seeds, and one scorer judges both; a second judge
(`second_scorer`) scores the same texts again, so a reduction that only fools the primary judge shows.
Fluency is always measured: perplexity on a neutral text when one is given (`ppl_text`), otherwise the
perplexity each arm assigns to the baseline's own continuations (teacher-forced from the states that
produced them, so it costs no forward pass). The report says which (`fluency_source`). Each arm also
gets the diversity of its continuations (distinct-1/2/3) and its rate of degenerate repetition. Metrics
are in `metrics.py` and `fluency.py`, perplexity in `perplexity.py`, the files in `report.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal, Protocol

import numpy as np
import torch

from eigenshift_core.fluency import PROTOCOL as FLUENCY_PROTOCOL
from eigenshift_core.fluency import fluency_metrics
from eigenshift_core.generation import Continuations, generate_continuations
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, output_layer
from eigenshift_core.metrics import (
    Estimate,
    estimates,
    paired_reduction,
    perplexity_intervals,
    toxicity_metrics,
    tph,
)
from eigenshift_core.perplexity import PerplexityResult, perplexity, token_logprobs
from eigenshift_core.progress import NO_HOOKS, StepHooks
from eigenshift_core.report import clean
from eigenshift_core.states import StateSet

FluencySource = Literal["ppl_text", "baseline_continuations"]
SCORE_BATCH = 256  # texts per scorer call: one progress report each


class TextScorer(Protocol):
    """What evaluation needs of a scorer: P(toxic) in [0, 1] per text."""

    name: str

    def score_texts(self, texts: Sequence[str]) -> list[float]: ...


def evaluate(
    lm: LoadedModel, prompts: Sequence[str], scorer: TextScorer, intervention: Intervention, *,
    samples: int = 25, max_new_tokens: int = 20, do_sample: bool = True, top_p: float = 0.95,
    temperature: float = 1.0, seed: int = 0, batch_size: int = 32, threshold: float = 0.5,
    ppl_text: str | None = None, ppl_window: int = 1024, ppl_stride: int = 512, ppl_max_tokens: int | None = None,
    heldout: StateSet | None = None, n_boot: int = 1000, second_scorer: TextScorer | None = None,
    hooks: StepHooks = NO_HOOKS,
) -> dict[str, Any]:
    """Baseline and intervention on the same prompts and seeds, as a JSON-ready report.

    Keys: `baseline` and `intervention` (each toxicity metric of `scorer` as {value, low, high},
    `perplexity`, `continuation_perplexity`, `distinct_1`..`distinct_3` and `repetition_rate`),
    `toxicity_reduction`, `tph` (from `perplexity`), `judges` ({second scorer's name: its `baseline`,
    `intervention` and `toxicity_reduction`}; empty without `second_scorer`), `fluency_source`,
    `heldout_logprob` (None without `heldout`), `protocol`, `intervention_info` and `examples` (samples
    whose text changed, largest score drop first, by `scorer`). With α = 1 both arms are identical.
    """
    generation: dict[str, Any] = {"samples": samples, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "top_p": top_p, "temperature": temperature, "seed": seed, "batch_size": batch_size}
    total = 2 * len(prompts) * samples
    base = generate_continuations(lm, prompts, progress=hooks.bars,
                                  on_progress=hooks.batches("evaluate: sampling", "samples", total=total), **generation)
    new = generate_continuations(lm, prompts, intervention=intervention, progress=hooks.bars, **generation,
                                 on_progress=hooks.batches("evaluate: sampling", "samples", offset=total // 2, total=total))
    texts, shape = base.texts + new.texts, (2, len(prompts), samples)  # (arm, prompt, sample)
    scores = score_in_batches(scorer, texts, hooks).reshape(shape)
    stats: dict[str, Any] = {"threshold": threshold, "n_boot": n_boot, "seed": seed}
    toxicity, reduction = _toxicity(scores, stats)
    judges: dict[str, Any] = {}
    if second_scorer is not None:
        name = judge_name(second_scorer)
        second = rescore(second_scorer, scorer, texts, scores, hooks, stage=f"evaluate: scoring ({name})")
        arms_2, reduction_2 = _toxicity(second, stats)
        judges[name] = {"baseline": arms_2[0], "intervention": arms_2[1], "toxicity_reduction": reduction_2.to_dict()}

    continuation_ppl = continuation_perplexities(lm, base, intervention)
    text_ppl: list[PerplexityResult | None] = [None, None]
    if ppl_text is not None:
        for arm, edit in enumerate((None, intervention)):
            text_ppl[arm] = perplexity(
                lm, ppl_text, window=ppl_window, stride=ppl_stride, max_tokens=ppl_max_tokens, intervention=edit,
                progress=hooks.bars, on_progress=hooks.batches(f"evaluate: perplexity ({('baseline', 'intervention')[arm]})", "windows"),
            )
    source: FluencySource = "ppl_text" if ppl_text is not None else "baseline_continuations"
    headline = [p.perplexity if p else None for p in text_ppl] if ppl_text is not None else continuation_ppl
    arms = [{**toxicity[arm], "perplexity": headline[arm], "continuation_perplexity": continuation_ppl[arm],
             **fluency_metrics(token_sequences(continuations))}
            for arm, continuations in enumerate((base, new))]
    report = {
        "baseline": arms[0],
        "intervention": arms[1],
        "toxicity_reduction": reduction.to_dict(),
        "tph": tph(reduction.value, float(headline[0]), float(headline[1])),  # type: ignore[arg-type]
        "perplexity_intervals": paired_perplexity(*text_ppl, n_boot=n_boot, seed=seed),
        "judges": judges,
        "fluency_source": source,
        "heldout_logprob": None if heldout is None else _heldout_report(lm, heldout, intervention, n_boot, seed),
        "protocol": {**generation, **stats, "n_prompts": len(prompts), "scorer": getattr(scorer, "name", "?"),
                     "second_scorer": next(iter(judges), None),
                     "perplexity": _ppl_protocol(text_ppl[0], ppl_max_tokens, base), "fluency": FLUENCY_PROTOCOL},
        "intervention_info": {"k": intervention.k, "indices": intervention.indices.tolist(),
                              "alphas": intervention.alphas.tolist()},
        "examples": _examples(list(prompts), base.texts, new.texts, scores, samples),
    }
    return clean(report)


def score_in_batches(scorer: TextScorer, texts: Sequence[str], hooks: StepHooks = NO_HOOKS, *,
                     stage: str = "evaluate: scoring") -> np.ndarray:
    """P(toxic) of every text, (n,) float64, scored `SCORE_BATCH` at a time with a report after each."""
    scores: list[float] = []
    for start in range(0, len(texts), SCORE_BATCH):
        scores.extend(scorer.score_texts(texts[start : start + SCORE_BATCH]))
        hooks.report(stage, len(scores), len(texts), "texts")
    return np.asarray(scores, dtype=float)


def judge_name(scorer: TextScorer) -> str:
    """How a report names a judge (its `name`)."""
    return str(getattr(scorer, "name", "second"))


def rescore(judge: TextScorer, first: TextScorer, texts: Sequence[str], scores: np.ndarray, hooks: StepHooks, *,
            stage: str) -> np.ndarray:
    """`judge`'s scores of `texts`, shaped like `scores` (those of `first`, the primary judge), which are
    reused when `judge` is `first`: a judge is never run twice on the same texts."""
    if judge is first:
        return scores
    return score_in_batches(judge, texts, hooks, stage=stage).reshape(scores.shape)


def toxicity_of(scores: np.ndarray, stats: dict[str, Any]) -> dict[str, Any]:
    """One arm's toxicity metrics, JSON-ready, from its (prompt, sample) scores; `stats`: threshold, n_boot, seed."""
    return {name: e.to_dict() for name, e in toxicity_metrics(scores, **stats).items()}


def _toxicity(scores: np.ndarray, stats: dict[str, Any]) -> tuple[list[dict[str, Any]], Estimate]:
    """Each arm's toxicity metrics (JSON-ready) and the paired reduction, from (arm, prompt, sample) scores."""
    return [toxicity_of(s, stats) for s in scores], paired_reduction(scores[0], scores[1], **stats)


def token_sequences(continuations: Continuations) -> list[list[int]]:
    """The generated token ids of every row, without padding."""
    return [continuations.row_tokens(row).tolist() for row in range(len(continuations))]


def continuation_perplexities(lm: LoadedModel, continuations: Continuations, intervention: Intervention) -> list[float]:
    """exp(mean −log p) of every generated token of `continuations` under W and under W', [base, new].

    The states that produced the tokens are the lm_head inputs under both heads (the intervention edits
    nothing before lm_head), so W' needs no forward pass."""
    mask = torch.arange(continuations.token_ids.shape[1])[None, :] < continuations.lengths[:, None]  # (n, T)
    states, tokens = continuations.states[mask], continuations.token_ids[mask]  # (m, d), (m,)
    if tokens.numel() == 0:
        return [float("nan"), float("nan")]
    head = output_layer(lm.model)
    return [float(torch.exp(-token_logprobs(head.weight, states, tokens, edit, bias=head.bias).mean()))
            for edit in (None, intervention)]


def paired_perplexity(base: PerplexityResult | None, new: PerplexityResult | None, *, n_boot: int,
                      seed: int) -> dict[str, Any] | None:
    """Both arms' text perplexity and its paired change in %, each with a window-block bootstrap interval
    ({baseline, intervention, change_pct}, JSON-ready); None unless both were measured."""
    if base is None or new is None:
        return None
    found = perplexity_intervals(base.window_nll, new.window_nll, base.window_tokens, n_boot=n_boot, seed=seed)
    return {name: estimate.to_dict() for name, estimate in found.items()}


def _ppl_protocol(result: PerplexityResult | None, max_tokens: int | None, base: Continuations) -> dict[str, Any]:
    """How the headline perplexity was measured."""
    if result is None:
        return {"source": "baseline_continuations", "tokens_scored": int(base.lengths.sum())}
    fields = {k: v for k, v in asdict(result).items()
              if k not in ("perplexity", "nll_per_token", "window_nll", "window_tokens")}
    return {"source": "ppl_text", **fields, "max_tokens": max_tokens}


def _heldout_report(lm: LoadedModel, heldout: StateSet, intervention: Intervention, n_boot: int, seed: int) -> dict:
    """Mean log p(token | state) of each held-out side before and after, and the paired change."""
    head = output_layer(lm.model)
    report: dict[str, Any] = {}
    for side, states, tokens in (("toxic", heldout.toxic, heldout.toxic_tokens),
                                 ("nontoxic", heldout.nontoxic, heldout.nontoxic_tokens)):
        if states.shape[0] == 0:
            report[side] = None
            continue
        before = token_logprobs(head.weight, states, tokens, bias=head.bias)
        after = token_logprobs(head.weight, states, tokens, intervention, bias=head.bias)
        values = torch.stack([before, after, after - before], dim=1).numpy()  # (m, 3)
        named = zip(("before", "after", "change"), estimates(values, n_boot, seed), strict=True)
        report[side] = {"n": int(states.shape[0]), **{name: e.to_dict() for name, e in named}}
    return report


def _examples(
    prompts: list[str], base: list[str], new: list[str], scores: np.ndarray, samples: int, limit: int = 5
) -> list[dict[str, Any]]:
    """Up to `limit` samples whose text changed, largest score drop first."""
    flat = scores.reshape(2, -1)  # (arm, rows); rows are prompt-major
    changed = [r for r in range(len(base)) if base[r] != new[r]]
    changed.sort(key=lambda r: flat[1, r] - flat[0, r])
    return [{"prompt": prompts[r // samples], "baseline": base[r], "intervention": new[r],
             "baseline_score": float(flat[0, r]), "intervention_score": float(flat[1, r])} for r in changed[:limit]]

"""Several interventions, side by side: one baseline, every method on the same prompts, seeds and judge.

The baseline is sampled once; each method's arm continues the same prompts with the same seeds (so a
method that changes nothing gives the baseline's texts), one scorer judges all (and a second judge, when
given, again), and each method gets what `evaluation.evaluate` would report for it alone: toxicity metrics
with bootstrap intervals, the paired reduction against the baseline under every judge, distinct-n and
repetition, and its perplexity on a neutral text with paired intervals. Any family works
(`families.DetoxIntervention`: EigenShift, AURA, ...). `comparison.json` and `comparison.png` (toxicity vs
perplexity, a labelled point per method) are the report.

CLI: `python -m eigenshift_core.compare --prompts P --rows A:B --intervention name=DIR ... --out DIR`
(`--aura-from-reference-csv CSV` also builds AURA on that step-2 CSV's `--aura-rows`); `eigenshift evaluate`
with several `--intervention` runs the same `run_compare`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from eigenshift_core.aura import POOLINGS, Pooling, build_aura_from_reference_csv
from eigenshift_core.configs import (
    FluencyOptions,
    SamplingConfig,
    ScoringConfig,
    SecondJudgeOptions,
    field_default,
)
from eigenshift_core.errors import InputError
from eigenshift_core.evaluation import (
    TextScorer,
    judge_name,
    paired_perplexity,
    rescore,
    score_in_batches,
    token_sequences,
    toxicity_of,
)
from eigenshift_core.families import DetoxIntervention, family_of, load_any
from eigenshift_core.files import atomic_write
from eigenshift_core.fluency import PROTOCOL as FLUENCY_PROTOCOL
from eigenshift_core.fluency import fluency_metrics
from eigenshift_core.generation import generate_continuations
from eigenshift_core.loading import LoadedModel
from eigenshift_core.metrics import paired_reduction, tph
from eigenshift_core.perplexity import PerplexityResult, perplexity
from eigenshift_core.progress import NO_HOOKS, StepHooks
from eigenshift_core.prompts import load_prompts, parse_rows
from eigenshift_core.report import clean

BASELINE = "baseline"


@dataclass(frozen=True)
class _Arm:
    """What one arm produced: its texts and their token ids, each judge's scores and its text perplexity."""

    texts: list[str]
    tokens: list[list[int]]
    scores: list[np.ndarray]  # per judge (primary first): (prompt, sample)
    ppl: PerplexityResult | None


def compare_interventions(
    lm: LoadedModel, prompts: Sequence[str], scorer: TextScorer, interventions: Mapping[str, DetoxIntervention], *,
    samples: int = 25, max_new_tokens: int = 20, do_sample: bool = True, top_p: float = 0.95,
    temperature: float = 1.0, seed: int = 0, batch_size: int = 32, threshold: float = 0.5,
    ppl_text: str | None = None, ppl_window: int = 1024, ppl_stride: int = 512, ppl_max_tokens: int | None = None,
    n_boot: int = 1000, second_scorer: TextScorer | None = None, hooks: StepHooks = NO_HOOKS,
) -> dict[str, Any]:
    """The baseline and every intervention on the same prompts and seeds, as a JSON-ready report.

    Keys: `baseline` (toxicity metrics of `scorer` as {value, low, high}, `perplexity`, `distinct_1`..
    `distinct_3`, `repetition_rate`, `judges`: {second scorer's name: its toxicity metrics}), `methods`
    ({name: the same plus `kind`, `k`, `toxicity_reduction` paired against the baseline (also under each
    judge), `tph`, `perplexity_intervals`, `unchanged_share` (continuations identical to the baseline's),
    `seconds`}), `protocol`. Perplexity is measured on `ppl_text` (None without it, and so are `tph` and
    `perplexity_intervals`). A method's figures are those `evaluation.evaluate` reports for it alone.
    """
    if not interventions:
        raise InputError("give at least one intervention to compare", field="intervention")
    if BASELINE in interventions:
        raise InputError(f"{BASELINE!r} names the unedited model; give the method another name", field="intervention")
    generation: dict[str, Any] = {"samples": samples, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "top_p": top_p, "temperature": temperature, "seed": seed, "batch_size": batch_size}
    stats: dict[str, Any] = {"threshold": threshold, "n_boot": n_boot, "seed": seed}
    ppl: dict[str, Any] = {"window": ppl_window, "stride": ppl_stride, "max_tokens": ppl_max_tokens}
    judges = [scorer] if second_scorer is None else [scorer, second_scorer]

    def run_arm(name: str, edit: DetoxIntervention | None) -> _Arm:
        # generate_continuations and perplexity only call `.applied(model)`, which every family offers.
        continuations = generate_continuations(lm, prompts, intervention=cast(Any, edit), progress=hooks.bars,
                                               on_progress=hooks.batches(f"compare: sampling ({name})", "samples"),
                                               **generation)
        texts = continuations.texts
        scores = score_in_batches(scorer, texts, hooks, stage=f"compare: scoring ({name})").reshape(len(prompts), samples)
        scores_2 = [rescore(judge, scorer, texts, scores, hooks, stage=f"compare: scoring ({name}, {judge_name(judge)})")
                    for judge in judges[1:]]
        text_ppl = None if ppl_text is None else perplexity(lm, ppl_text, **ppl, intervention=cast(Any, edit),
                                                             progress=hooks.bars)
        return _Arm(texts, token_sequences(continuations), [scores, *scores_2], text_ppl)

    base = run_arm(BASELINE, None)
    report: dict[str, Any] = {BASELINE: _figures(base, None, judges, stats), "methods": {}}
    for name, edit in interventions.items():
        started = time.monotonic()
        arm = run_arm(name, edit)
        report["methods"][name] = {
            "kind": family_of(edit), "k": edit.k, **_figures(arm, base, judges, stats),
            "unchanged_share": float(np.mean([a == b for a, b in zip(arm.texts, base.texts, strict=True)])),
            "seconds": round(time.monotonic() - started, 1),
        }
    report["protocol"] = {**generation, **stats, "n_prompts": len(prompts), "scorer": getattr(scorer, "name", "?"),
                          "second_scorer": judge_name(second_scorer) if second_scorer is not None else None,
                          "perplexity": {"source": "ppl_text" if ppl_text is not None else None, **ppl},
                          "fluency": FLUENCY_PROTOCOL}
    return cast(dict[str, Any], clean(report))


def _figures(arm: _Arm, base: _Arm | None, judges: list[TextScorer], stats: dict[str, Any]) -> dict[str, Any]:
    """One arm's figures; a method's (`base` given) add what is paired against the baseline: the toxicity
    reduction under every judge, the TPH and the perplexity intervals (as `evaluate` computes them)."""
    judged = [toxicity_of(scores, stats) for scores in arm.scores]  # per judge, the primary first
    paired: dict[str, Any] = {}
    if base is not None:
        reductions = [paired_reduction(b, a, **stats) for b, a in zip(base.scores, arm.scores, strict=True)]
        for figures, reduction in zip(judged, reductions, strict=True):
            figures["toxicity_reduction"] = reduction.to_dict()
        ppl = [a.ppl.perplexity for a in (base, arm) if a.ppl is not None]  # [base, method] when measured
        paired = {"tph": tph(reductions[0].value, *ppl) if len(ppl) == 2 else None,
                  "perplexity_intervals": paired_perplexity(base.ppl, arm.ppl, n_boot=stats["n_boot"], seed=stats["seed"])}
    return {**judged[0], "perplexity": None if arm.ppl is None else arm.ppl.perplexity, **fluency_metrics(arm.tokens),
            "judges": {judge_name(judge): figures for judge, figures in zip(judges[1:], judged[1:], strict=True)},
            **paired}


# ----------------------------------------------------------------------------------------------------------
# The report on disk


def write_comparison(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """`comparison.json` and `comparison.png` (toxicity rate vs perplexity, one labelled point per method)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean(report), indent=2, allow_nan=False) + "\n"
    json_path, png_path = out_dir / "comparison.json", out_dir / "comparison.png"
    atomic_write(json_path, lambda path: path.write_text(text))
    figure = _comparison_figure(report)
    atomic_write(png_path, lambda path: figure.savefig(path, format="png", dpi=120))
    return [json_path, png_path]


def _comparison_figure(report: dict[str, Any]) -> Any:
    """A bare Agg figure: x perplexity (or the method's position when none was measured), y toxicity rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    points = {BASELINE: report[BASELINE], **report["methods"]}
    with_ppl = all(p.get("perplexity") is not None for p in points.values())
    for i, (name, point) in enumerate(points.items()):
        rate = point["toxicity_rate"]
        x = point["perplexity"] if with_ppl else i
        y = rate["value"] or 0.0
        low, high = rate.get("low"), rate.get("high")
        yerr = [[y - low], [high - y]] if low is not None and high is not None else None
        ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, color="black" if name == BASELINE else None)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="perplexity (neutral text)" if with_ppl else "method", ylabel="toxicity rate (95 % CI)",
           title="toxicity vs fluency, by method")
    return figure


# ----------------------------------------------------------------------------------------------------------
# The step: a typed config, then the function above


@dataclass(frozen=True, kw_only=True)
class CompareConfig(SamplingConfig, ScoringConfig, SecondJudgeOptions, FluencyOptions):
    """Compare `interventions` ({name: artifact dir}) and, with `aura_reference_csv`, AURA built on its
    `aura_rows`, on held-out `rows` of `prompts`. `eigenshift evaluate` with several interventions runs this."""

    prompts: Path
    rows: str | None = None
    interventions: dict[str, Path] = field(default_factory=dict)
    aura_reference_csv: Path | None = None
    aura_rows: str = "0:4000"
    aura_name: str = "aura"
    aura_pooling: Pooling = "max"
    aura_max_tokens: int = 64


def run_compare(lm: LoadedModel, config: CompareConfig, out: Path, scorer: TextScorer | None = None,
                hooks: StepHooks = NO_HOOKS) -> dict[str, Any]:
    """Load (and build) the interventions, compare them, write `comparison.json`/`.png` into `out`."""
    from eigenshift_core.scoring import load_scorer
    from eigenshift_core.steps import load_second_scorer, read_ppl_text

    held_out = load_prompts(config.prompts, config.rows)
    ppl_text = read_ppl_text(config.ppl_text)
    interventions = {name: load_any(path, lm.model) for name, path in config.interventions.items()}
    timings: dict[str, float] = {}
    if config.aura_reference_csv is not None:
        if config.aura_name in interventions:
            raise InputError(f"two methods named {config.aura_name!r}", field="aura_name")
        _require_disjoint_rows(config.aura_rows, held_out.start, held_out.stop)
        started = time.monotonic()
        aura = build_aura_from_reference_csv(lm, config.aura_reference_csv, rows=config.aura_rows,
                                             batch_size=config.batch_size, pooling=config.aura_pooling,
                                             max_tokens=config.aura_max_tokens)
        aura.save(Path(out) / config.aura_name)
        timings[f"build_{config.aura_name}"] = round(time.monotonic() - started, 1)
        interventions[config.aura_name] = aura
    scorer = scorer or load_scorer(config.scorer, device=str(lm.device))
    second_scorer = load_second_scorer(config.second_scorer, device=str(lm.device))
    report = compare_interventions(
        lm, held_out.texts, scorer, interventions, samples=config.samples, max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample, top_p=config.top_p, temperature=config.temperature, seed=config.seed,
        batch_size=config.batch_size, threshold=config.threshold, ppl_text=ppl_text, ppl_window=config.ppl_window,
        ppl_stride=config.ppl_stride, ppl_max_tokens=config.ppl_max_tokens, n_boot=config.n_boot,
        second_scorer=second_scorer, hooks=hooks,
    )
    report.update({"model": lm.model_id, "eval_prompts": held_out.describe(), "timings_s": timings,
                   "provenance": {name: dict(edit.info) for name, edit in interventions.items()}})
    write_comparison(report, out)
    return report


def _require_disjoint_rows(train: str, start: int, stop: int) -> None:
    """The reference CSV's rows are the prompt file's rows (same prompts, same order): AURA must not see
    the evaluated prompts' generations."""
    a, b = parse_rows(train, 10**9, field="aura_rows")
    if a < stop and start < b:
        raise InputError(f"AURA rows {train} overlap the evaluated rows {start}:{stop}", field="aura_rows")


# ----------------------------------------------------------------------------------------------------------
# CLI (beside `eigenshift`'s, reusing its flags and its one-line errors)


def _named_dir(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"must look like name=DIR, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    from eigenshift_core import cli

    p = cli.OneLineParser(prog="python -m eigenshift_core.compare", description=__doc__,
                          formatter_class=cli.HelpFormatter)
    cli._add_model(p)
    cli._add_prompts(p)
    cli._add_sampling(p)
    cli._add_scorer(p)
    p.add_argument("--intervention", type=_named_dir, action="append", default=[],
                   help="name=DIR of an intervention artifact (any family); repeat for several")
    p.add_argument("--aura-from-reference-csv", type=Path, default=None,
                   help="build AURA on this step-2 CSV (generations labelled yes vs no) and compare it too")
    p.add_argument("--aura-rows", default="0:4000", help="rows A:B of the CSV that build AURA")
    p.add_argument("--aura-name", default="aura", help="the built AURA's name (and its directory under --out)")
    p.add_argument("--aura-pooling", choices=POOLINGS, default="max", help="pooling of activations over tokens")
    p.add_argument("--aura-max-tokens", type=cli._positive, default=64, help="tokens of each text read")
    p.add_argument("--ppl-text", type=Path, default=None, help="neutral text for perplexity (None: no perplexity)")
    p.add_argument("--ppl-window", type=cli._positive, default=field_default("ppl_window"), help="tokens per window")
    p.add_argument("--ppl-stride", type=cli._positive, default=field_default("ppl_stride"), help="tokens between windows")
    p.add_argument("--ppl-max-tokens", type=cli._positive, default=field_default("ppl_max_tokens"),
                   help="tokens of --ppl-text scored")
    p.add_argument("--n-boot", type=cli._positive, default=field_default("n_boot"), help="bootstrap resamples")
    cli._add_second_judge(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from eigenshift_core import cli
    from eigenshift_core.configs import config_from

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    cli._quiet_libraries()
    prog = "eigenshift compare"
    try:
        config = config_from(CompareConfig, {**vars(args), "do_sample": not args.greedy},
                             interventions=cli.unique_names(args.intervention),
                             aura_reference_csv=args.aura_from_reference_csv)
        started = time.monotonic()
        run_compare(cli._load(args), config, args.out, hooks=cli._hooks())
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    except OSError as error:
        print(f"{prog}: error: {error.strerror or error}: {error.filename or ''}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(f"{args.out / 'comparison.json'} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

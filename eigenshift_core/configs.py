"""What each step is asked to do: typed, frozen configs, and the one place every default lives.

The CLI turns flags into these, a worker turns a job's spec into these, and the API's schemas take their
defaults from them (`default_of`), so the three cannot disagree. Field groups are shared by inheritance:
a pipeline is the union of its steps' fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eigenshift_core.criteria import DEFAULT_CRITERION
from eigenshift_core.errors import InputError

AlphaSpec = float | Sequence[float] | str  # one α, k of them, or "auto" (the criterion's own)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How continuations are sampled (the paper's protocol: 25 samples, 20 tokens, top-p 0.95, T 1.0)."""

    samples: int = 25
    max_new_tokens: int = 20
    do_sample: bool = True
    top_p: float = 0.95
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """Which judge scores continuations, and from which score a text counts as toxic."""

    scorer: str = "profanity"
    threshold: float = 0.5


@dataclass(frozen=True, kw_only=True)
class SecondJudgeOptions:
    """A second judge of the evaluated continuations, reported beside `scorer` (which keeps the headline,
    so the paper's 50 % target stays comparable)."""

    second_scorer: str | None = "ensemble"  # None: the primary judge only


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    top_words: int = 3  # toxic words taken per toxic continuation
    require_argmax: bool = False  # keep a toxic state only where the model's argmax is the word's token
    max_nontoxic: int = 200_000  # cap on non-toxic states (seeded subsample)
    chunk_prompts: int = 256  # prompts generated and judged at once: memory does not grow with the set


@dataclass(frozen=True, kw_only=True)
class SelectOptions:
    criterion: str = DEFAULT_CRITERION
    k: int | None = None  # None (and no percentile): DEFAULT_K, capped at d
    percentile: float | None = None  # the paper's p: k = ceil(d·(1 − p))
    alpha: AlphaSpec = "auto"


@dataclass(frozen=True, kw_only=True)
class FluencyOptions:
    ppl_text: Path | None = None  # neutral text for perplexity; None: the baseline's own continuations
    ppl_window: int = 1024
    ppl_stride: int = 512
    ppl_max_tokens: int | None = 16384
    n_boot: int = 1000


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(SamplingConfig):
    """Step 1: continuations of `prompts` (rows A:B) with the state behind every token."""

    prompts: Path
    rows: str | None = None


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(SamplingConfig, ScoringConfig, ExtractOptions):
    """Step 2: toxic and non-toxic states from a generate output (`generations`), or from `prompts`
    generated here, and/or from a reference step-2 CSV teacher-forced (`reference_csv`, same `rows`)."""

    generations: Path | None = None
    prompts: Path | None = None
    rows: str | None = None
    reference_csv: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig(SelectOptions):
    """Step 3: decompose lm_head, select with `criterion`, damp by α; states from step 2."""

    states: Path


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(SamplingConfig, ScoringConfig, SecondJudgeOptions, FluencyOptions):
    """Step 4 on held-out `prompts`: one intervention against the baseline (`intervention`, or `interventions`
    with one entry), or several side by side (`interventions`: {name: artifact dir}, one baseline, the same
    prompts and seeds). `reference_csv` adds teacher-forced held-out log-probs (one intervention only)."""

    prompts: Path
    rows: str | None = None
    intervention: Path | None = None
    interventions: dict[str, Path] = dataclasses.field(default_factory=dict)
    reference_csv: Path | None = None

    def __post_init__(self) -> None:
        if (self.intervention is None) == (not self.interventions):
            raise InputError("give exactly one of intervention and interventions", field="intervention")

    @property
    def methods(self) -> dict[str, Path]:
        """{name: directory} of every intervention evaluated (`intervention` is named by its directory)."""
        if self.intervention is not None:
            return {Path(self.intervention).name: Path(self.intervention)}
        return dict(self.interventions)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(SamplingConfig, ScoringConfig, SecondJudgeOptions, ExtractOptions, SelectOptions,
                     FluencyOptions):
    """All four steps: build on `train_rows`, evaluate on the disjoint `eval_rows` of `prompts`.

    train_samples: samples per training prompt (None: `samples`); 0 takes the training states from
    `reference_csv` only."""

    prompts: Path
    train_rows: str
    eval_rows: str
    train_samples: int | None = None
    reference_csv: Path | None = None


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of a config class (for schemas and flags that mirror it)."""
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is dataclasses.MISSING:
                raise KeyError(f"{config.__name__}.{name} has no default")
            return field.default
    raise KeyError(f"{config.__name__} has no field {name!r}")


def field_default(name: str) -> Any:
    """The default of field `name`, which every config that has the field shares (for flags and schemas)."""
    for config in (PipelineConfig, EvaluateConfig, ExtractConfig, ReconstructConfig, GenerateConfig):
        try:
            return default_of(config, name)
        except KeyError:
            continue
    raise KeyError(f"no config has a field {name!r}")


def config_from(config: type, values: Any, **given: Any) -> Any:
    """A `config` from the same-named attributes (or keys) of `values`, with `given` taking precedence."""
    names = {field.name for field in dataclasses.fields(config)}
    get = values.get if isinstance(values, dict) else (lambda name, default: getattr(values, name, default))
    missing = object()
    taken = {name: get(name, missing) for name in names - set(given)}
    return config(**{name: value for name, value in taken.items() if value is not missing}, **given)

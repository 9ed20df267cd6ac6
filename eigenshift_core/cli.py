"""`eigenshift`: the four steps (generate, extract, reconstruct, evaluate), export, and the whole pipeline.

Every subcommand writes into `--out DIR` and never deletes what an earlier step wrote there. Bad input
is one line on stderr and exit code 2. Flags only fill the core's configs (`eigenshift_core.configs`),
whose defaults are the ones shown here.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from eigenshift_core.configs import (
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    PipelineConfig,
    ReconstructConfig,
    config_from,
    field_default,
)
from eigenshift_core.errors import InputError

STEPS = ("generate", "extract", "reconstruct", "evaluate", "export", "pipeline")
EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help; descriptions kept as written."""


# ----------------------------------------------------------------------------------------------------------
# Flags


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _alphas(text: str) -> float | list[float] | str:
    if text == "auto":
        return text
    values = [_finite_float(part) for part in text.split(",")]
    return values[0] if len(values) == 1 else values


def _optional_scorer(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


def _intervention(text: str) -> tuple[str, Path]:
    """`name=DIR`, or a bare `DIR` named by its directory's name."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name:
        return Path(text).resolve().name, Path(text)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"must look like DIR or name=DIR, got {text!r}")
    return name, Path(path)


def unique_names(named: Sequence[tuple[str, Path]]) -> dict[str, Path]:
    """{name: directory} of repeated `--intervention` flags; a name given twice is an error."""
    names = [name for name, _ in named]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(f"intervention names must differ: {', '.join(map(repr, twice))} given more than once "
                         "(name each one: --intervention NAME=DIR)", field="intervention")
    return dict(named)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="hub id, local directory, or 'embedded'")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=None, help="hub token for gated models")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="weights' dtype")
    p.add_argument("--cache-dir", type=Path, default=None, help="where `embedded` is converted once "
                   "(None: ~/.cache/eigenshift)")
    p.add_argument("--batch-size", type=_positive, default=field_default("batch_size"), help="rows per forward pass")
    p.add_argument("--seed", type=int, default=field_default("seed"), help="seeds sampling and subsampling")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def _add_prompts(p: argparse.ArgumentParser, *, rows: bool = True) -> None:
    p.add_argument("--prompts", type=Path, required=True, help="CSV/JSONL (column `prompt`) or TXT (a prompt a line)")
    if rows:
        p.add_argument("--rows", default=None, help="half-open row range A:B of the prompt file (None: all)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=_positive, default=field_default("samples"), help="continuations per prompt (paper: 25)")
    p.add_argument("--max-new-tokens", type=_positive, default=field_default("max_new_tokens"), help="tokens per continuation")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--top-p", type=_finite_float, default=field_default("top_p"), help="nucleus sampling mass")
    p.add_argument("--temperature", type=_finite_float, default=field_default("temperature"), help="sampling temperature")


def _add_scorer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", default=field_default("scorer"), help="profanity, hf:<id-or-dir>, detoxify:<ckpt>")
    p.add_argument("--threshold", type=_finite_float, default=field_default("threshold"),
                   help="score at which a text counts as toxic")


def _add_reconstruct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", default=field_default("criterion"), help="selection criterion: selectivity (toxic "
                   "gain per unit of ordinary cost; chooses α), delta (the paper's, sign-free), logit (toxic-token "
                   "logit contribution)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, default=None, help="number of directions to damp (None: 100, at most d)")
    group.add_argument("--percentile", type=_finite_float, default=None, help="paper's p: k = ceil(d·(1 − p))")
    p.add_argument("--alpha", type=_alphas, default=field_default("alpha"), help="scale of the chosen σᵢ: one value, "
                   "k comma-separated values, or 'auto' (the criterion's own, per direction)")


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-words", type=_positive, default=field_default("top_words"), help="toxic words taken per toxic continuation")
    p.add_argument("--require-argmax", action="store_true", help="keep a toxic state only where the model's argmax is the word's token")
    p.add_argument("--max-nontoxic", type=_positive, default=field_default("max_nontoxic"), help="cap on non-toxic states (seeded subsample)")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl-text", type=Path, default=None, help="neutral text for perplexity (e.g. WikiText-2 test); "
                   "None: the perplexity of the baseline's own continuations")
    p.add_argument("--ppl-window", type=_positive, default=field_default("ppl_window"), help="tokens per perplexity window")
    p.add_argument("--ppl-stride", type=_positive, default=field_default("ppl_stride"), help="tokens between window starts")
    p.add_argument("--ppl-max-tokens", type=_positive, default=field_default("ppl_max_tokens"), help="tokens of --ppl-text scored")
    p.add_argument("--n-boot", type=_positive, default=field_default("n_boot"), help="bootstrap resamples for the 95 %% intervals")
    _add_second_judge(p)


def _add_second_judge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--second-scorer", type=_optional_scorer, default=field_default("second_scorer"),
                   help="a second judge reported beside --scorer (under `judges`); 'none' disables it")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eigenshift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # type: ignore[method-assign]

    p = sub.add_parser("generate", help="step 1: continue prompts and capture the lm_head input of every token")
    _add_model(p)
    _add_prompts(p)
    _add_sampling(p)

    p = sub.add_parser("extract", help="step 2: judge continuations and collect toxic / non-toxic states")
    _add_model(p)
    _add_scorer(p)
    _add_extract(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--generations", type=Path, help="output directory of `eigenshift generate`")
    source.add_argument("--reference-csv", type=Path, help="instead of --generations: a step-2 CSV (prompt, "
                        "generation, label, toxic_words) whose rows are teacher-forced through the model")
    p.add_argument("--rows", default=None, help="rows A:B of --reference-csv (None: all)")

    p = sub.add_parser("reconstruct", help="step 3: decompose lm_head, select and damp directions")
    _add_model(p)
    _add_reconstruct(p)
    p.add_argument("--states", type=Path, required=True, help="states.safetensors from `eigenshift extract`")

    p = sub.add_parser("evaluate", help="step 4: toxicity and perplexity before and after, on held-out prompts")
    _add_model(p)
    _add_prompts(p)
    _add_sampling(p)
    _add_scorer(p)
    _add_evaluate(p)
    p.add_argument("--intervention", type=_intervention, action="append", required=True,
                   help="intervention directory, or name=DIR; repeat it to compare several (any family) with one "
                   "baseline on the same prompts and seeds (comparison.json instead of report.json)")
    p.add_argument("--reference-csv", type=Path, default=None, help="a step-2 CSV whose --rows are the held-out "
                   "prompts': their toxic and ordinary tokens' log-probabilities, teacher-forced, before and after")

    p = sub.add_parser("export", help="write a HF model with the rebuilt head, or a PEFT LoRA adapter")
    _add_model(p)
    p.add_argument("--intervention", type=Path, required=True, help="intervention directory")
    p.add_argument("--format", choices=["hf", "lora"], default="hf", help="what to write")

    p = sub.add_parser("pipeline", help="all four steps: build on --train-rows, evaluate on --eval-rows")
    _add_model(p)
    _add_prompts(p, rows=False)
    _add_sampling(p)
    _add_scorer(p)
    _add_extract(p)
    _add_reconstruct(p)
    _add_evaluate(p)
    p.add_argument("--train-rows", required=True, help="rows A:B that build the intervention")
    p.add_argument("--eval-rows", required=True, help="rows C:D that evaluate it (disjoint from train rows)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="samples per train prompt (default --samples); 0 takes states from --reference-csv only")
    p.add_argument("--reference-csv", type=Path, default=None,
                   help="also teacher-force this step-2 CSV's train rows into the training states")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Commands: flags to a config, then the core's step function. The core does the work.


def _load(args: argparse.Namespace):  # -> LoadedModel
    from eigenshift_core.loading import DEFAULT_CACHE_DIR, load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision, token=args.token,
                      cache_dir=args.cache_dir or DEFAULT_CACHE_DIR)


def _config(config: type, args: argparse.Namespace, **given: Any) -> Any:
    values = {**vars(args), "do_sample": not getattr(args, "greedy", False)}  # --greedy is do_sample=False
    return config_from(config, values, **given)


def _hooks():  # -> StepHooks
    from eigenshift_core.progress import StepHooks

    return StepHooks(bars=True)


def run_generate(args: argparse.Namespace) -> Path:
    from eigenshift_core.steps import run_generate as generate

    config = _config(GenerateConfig, args)
    return generate(_load(args), config, args.out, _hooks()).out


def run_extract(args: argparse.Namespace) -> Path:
    import json

    from eigenshift_core.steps import run_extract as extract

    if args.rows and not args.reference_csv:
        raise InputError("--rows applies to --reference-csv only", field="rows")
    config = _config(ExtractConfig, args, prompts=None)
    result = extract(_load(args), config, args.out, _hooks())
    print(json.dumps(result.counts), file=sys.stderr)
    return result.out


def run_reconstruct(args: argparse.Namespace) -> Path:
    from eigenshift_core.steps import run_reconstruct as reconstruct

    config = _config(ReconstructConfig, args)
    return reconstruct(_load(args), config, args.out, info={"states": str(args.states)}).out


def run_evaluate(args: argparse.Namespace) -> Path:
    from eigenshift_core.steps import run_evaluate as evaluate

    config = _config(EvaluateConfig, args, intervention=None, interventions=unique_names(args.intervention))
    return evaluate(_load(args), config, args.out, _hooks()).out


def run_export(args: argparse.Namespace) -> Path:
    from eigenshift_core.export import export_hf_model, export_lora_adapter
    from eigenshift_core.intervention import Intervention

    lm = _load(args)
    intervention = Intervention.load(args.intervention, lm.model)
    export = export_hf_model if args.format == "hf" else export_lora_adapter
    return export(lm, intervention, args.out)


def run_pipeline(args: argparse.Namespace) -> Path:
    from eigenshift_core.pipeline import run_pipeline as pipeline

    config = _config(PipelineConfig, args)
    return pipeline(_load(args), config, args.out, _hooks()).out


COMMANDS = {"generate": run_generate, "extract": run_extract, "reconstruct": run_reconstruct,
            "evaluate": run_evaluate, "export": run_export, "pipeline": run_pipeline}


def _quiet_libraries() -> None:
    """stderr is for our progress bars and our one-line errors, not for transformers' loading chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one line
        return int(stop.code or 0)
    _quiet_libraries()
    try:
        out = COMMANDS[args.command](args)
    except InputError as error:
        print(f"eigenshift {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # unwritable --out, full disk: the environment, not a bug
        print(f"eigenshift {args.command}: error: {error.strerror or error}: {error.filename or ''}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

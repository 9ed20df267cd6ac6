"""`eigenshift`: the four steps (generate, extract, reconstruct, evaluate), export, and the whole pipeline.

Every subcommand writes into `--out DIR` and never deletes what an earlier step wrote there. Bad input
is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from eigenshift_core.errors import InputError

STEPS = ("generate", "extract", "reconstruct", "evaluate", "export", "pipeline")
EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="hub id, local directory, or 'embedded' (default)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=None, help="hub token for gated models")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--cache-dir", type=Path, default=None, help="where `embedded` is converted once")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory")


def _add_prompts(p: argparse.ArgumentParser, *, rows: bool = True) -> None:
    p.add_argument("--prompts", type=Path, required=True, help="CSV/JSONL (column `prompt`) or TXT (a prompt a line)")
    if rows:
        p.add_argument("--rows", default=None, help="half-open row range A:B of the prompt file (default: all)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=_positive, default=25, help="continuations per prompt (paper: 25)")
    p.add_argument("--max-new-tokens", type=_positive, default=20)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--top-p", type=_finite_float, default=0.95)
    p.add_argument("--temperature", type=_finite_float, default=1.0)


def _add_scorer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", default="profanity", help="profanity (default), hf:<id-or-dir>, detoxify:<ckpt>")
    p.add_argument("--threshold", type=_finite_float, default=0.5, help="score at which a text counts as toxic")


def _add_reconstruct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", default="delta", help="selection criterion: delta (the paper's, sign-free), "
                   "logit (toxic-token logit contribution), selectivity (toxic gain per unit of ordinary cost)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, default=None, help="number of directions to damp")
    group.add_argument("--percentile", type=_finite_float, default=None, help="paper's p: k = ceil(d·(1 − p))")
    p.add_argument("--alpha", type=_alphas, default=0.5, help="scale of the chosen σᵢ: one value, k comma-separated values, or 'auto' "
                   "(per-direction, from the selectivity terms)")


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-words", type=_positive, default=3, help="toxic words taken per toxic continuation")
    p.add_argument("--require-argmax", action="store_true", help="keep a toxic state only where the model's argmax is the word's token")
    p.add_argument("--max-nontoxic", type=_positive, default=200_000, help="cap on non-toxic states (seeded subsample)")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl-text", type=Path, default=None, help="neutral text for perplexity (e.g. WikiText-2 test)")
    p.add_argument("--ppl-window", type=_positive, default=1024)
    p.add_argument("--ppl-stride", type=_positive, default=512)
    p.add_argument("--ppl-max-tokens", type=_positive, default=16384)
    p.add_argument("--n-boot", type=_positive, default=1000)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eigenshift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("generate", help="step 1: continue prompts and capture the lm_head input of every token")
    _add_model(p), _add_prompts(p), _add_sampling(p)

    p = sub.add_parser("extract", help="step 2: judge continuations and collect toxic / non-toxic states")
    _add_model(p), _add_scorer(p), _add_extract(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--generations", type=Path, help="output directory of `eigenshift generate`")
    source.add_argument("--reference-csv", type=Path, help="a step-2 CSV (prompt, generation, label, toxic_words), teacher-forced")
    p.add_argument("--rows", default=None, help="rows A:B of --reference-csv")

    p = sub.add_parser("reconstruct", help="step 3: decompose lm_head, select and damp directions")
    _add_model(p), _add_reconstruct(p)
    p.add_argument("--states", type=Path, required=True, help="states.safetensors from `eigenshift extract`")

    p = sub.add_parser("evaluate", help="step 4: toxicity and perplexity before and after, on held-out prompts")
    _add_model(p), _add_prompts(p), _add_sampling(p), _add_scorer(p), _add_evaluate(p)
    p.add_argument("--intervention", type=Path, required=True, help="intervention directory")

    p = sub.add_parser("export", help="write a HF model with the rebuilt head, or a PEFT LoRA adapter")
    _add_model(p)
    p.add_argument("--intervention", type=Path, required=True)
    p.add_argument("--format", choices=["hf", "lora"], default="hf")

    p = sub.add_parser("pipeline", help="all four steps: build on --train-rows, evaluate on --eval-rows")
    _add_model(p), _add_prompts(p, rows=False), _add_sampling(p), _add_scorer(p), _add_extract(p)
    _add_reconstruct(p), _add_evaluate(p)
    p.add_argument("--train-rows", required=True, help="rows A:B that build the intervention")
    p.add_argument("--eval-rows", required=True, help="rows C:D that evaluate it (disjoint from train rows)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="samples per train prompt (default --samples); 0 takes states from --reference-csv only")
    p.add_argument("--reference-csv", type=Path, default=None,
                   help="also teacher-force this step-2 CSV's train rows into the training states")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Commands: parse, call the core, write files. The core does the work.


def _load(args: argparse.Namespace):  # -> LoadedModel
    from eigenshift_core.loading import DEFAULT_CACHE_DIR, load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision, token=args.token,
                      cache_dir=args.cache_dir or DEFAULT_CACHE_DIR)


def _write_json(path: Path, data: object) -> None:
    from eigenshift_core.files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    return {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy,
            "top_p": args.top_p, "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size}


def run_generate(args: argparse.Namespace) -> Path:
    from eigenshift_core.generation import generate_continuations
    from eigenshift_core.prompts import load_prompts

    prompts = load_prompts(args.prompts, args.rows)
    lm = _load(args)
    result = generate_continuations(lm, prompts.texts, progress=True, **_sampling(args))
    result.save(args.out)
    _write_json(args.out / "generate.json", {"model": args.model, "prompts": prompts.describe(), **_sampling(args)})
    return args.out


def run_extract(args: argparse.Namespace) -> Path:
    from eigenshift_core.extraction import extract_states, import_reference_csv
    from eigenshift_core.generation import Continuations
    from eigenshift_core.scoring import load_scorer

    if args.rows and not args.reference_csv:
        raise InputError("--rows applies to --reference-csv only", field="rows")
    lm = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference_csv:
        states, _ = import_reference_csv(lm, args.reference_csv, rows=args.rows, require_argmax=args.require_argmax,
                                         max_nontoxic=args.max_nontoxic, batch_size=args.batch_size, seed=args.seed,
                                         progress=True)
    else:
        scorer = load_scorer(args.scorer, device=args.device)
        states, judgements = extract_states(lm, Continuations.load(args.generations), scorer, threshold=args.threshold,
                                            top_words=args.top_words, require_argmax=args.require_argmax,
                                            max_nontoxic=args.max_nontoxic, seed=args.seed)
        (args.out / "judgements.jsonl").write_text("".join(json.dumps(j.to_dict()) + "\n" for j in judgements))
    states.save(args.out / "states.safetensors")
    _write_json(args.out / "extract.json", {"model": args.model, "counts": states.counts(), **states.info})
    states.require_both()
    print(json.dumps(states.counts()), file=sys.stderr)
    return args.out


def run_reconstruct(args: argparse.Namespace) -> Path:
    from eigenshift_core.intervention import build_intervention
    from eigenshift_core.states import StateSet

    states = StateSet.load(args.states)
    lm = _load(args)
    intervention = build_intervention(
        lm.model, states, criterion=args.criterion, k=args.k, percentile=args.percentile,
        alpha=args.alpha, info={"model_id": args.model, "revision": args.revision, "states": str(args.states)},
    )
    return intervention.save(args.out)


def run_evaluate(args: argparse.Namespace) -> Path:
    from eigenshift_core.evaluation import evaluate, write_report
    from eigenshift_core.intervention import Intervention
    from eigenshift_core.pipeline import read_ppl_text
    from eigenshift_core.prompts import load_prompts
    from eigenshift_core.scoring import load_scorer

    prompts = load_prompts(args.prompts, args.rows)
    ppl_text = read_ppl_text(args.ppl_text)
    lm = _load(args)
    intervention = Intervention.load(args.intervention, lm.model)
    scorer = load_scorer(args.scorer, device=args.device)
    report = evaluate(
        lm, prompts.texts, scorer, intervention, samples=args.samples, max_new_tokens=args.max_new_tokens,
        top_p=args.top_p, temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
        threshold=args.threshold, ppl_text=ppl_text, ppl_window=args.ppl_window, ppl_stride=args.ppl_stride,
        ppl_max_tokens=args.ppl_max_tokens, n_boot=args.n_boot, progress=True,
    )
    report.update({"model": args.model, "eval_prompts": prompts.describe(), "scorer": scorer.name,
                   "provenance": intervention.info, "seed": args.seed})
    write_report(report, args.out, intervention)
    return args.out


def run_export(args: argparse.Namespace) -> Path:
    from eigenshift_core.export import export_hf_model, export_lora_adapter
    from eigenshift_core.intervention import Intervention

    lm = _load(args)
    intervention = Intervention.load(args.intervention, lm.model)
    export = export_hf_model if args.format == "hf" else export_lora_adapter
    return export(lm, intervention, args.out)


def run_pipeline(args: argparse.Namespace) -> Path:
    from eigenshift_core.pipeline import PipelineConfig
    from eigenshift_core.pipeline import run_pipeline as pipeline

    config = PipelineConfig(
        model=args.model, prompts=args.prompts, train_rows=args.train_rows, eval_rows=args.eval_rows,
        scorer=args.scorer, threshold=args.threshold, samples=args.samples,
        train_samples=args.samples if args.train_samples is None else args.train_samples, max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
        batch_size=args.batch_size, top_words=args.top_words, require_argmax=args.require_argmax,
        max_nontoxic=args.max_nontoxic, criterion=args.criterion, k=args.k, percentile=args.percentile,
        alpha=args.alpha, reference_csv=args.reference_csv, ppl_text=args.ppl_text, ppl_window=args.ppl_window,
        ppl_stride=args.ppl_stride, ppl_max_tokens=args.ppl_max_tokens, n_boot=args.n_boot,
    )
    return pipeline(_load(args), config, args.out, progress=True)


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

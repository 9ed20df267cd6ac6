"""Benchmark: sampling many continuations per prompt, ours against the way it was done before.

Task: the evaluation's generation, the first 128 RealToxicityPrompts prompts × 10 samples × 20 new tokens,
sampled (top_p 0.95, T 1.0), on `embedded`, batch 32 (the steps' default). Every arm is
`generate_continuations` with the same arguments but its switches:
- ours, as the steps run it: `share_prefill=True` (each distinct prompt of a batch prefilled once, its KV
  cache gathered to its samples), `fast_sampling=True` (the nucleus found by sorting values only,
  `SortFreeTopP`, and torch.multinomial's draws replayed where the nucleus is, `ReplayedMultinomial`) and
  the default `workers` (on a CPU, one batch per torch thread, side by side);
- ours on one worker (`workers=1`: one batch at a time on all the threads), so the report shows what the
  parallel batches add;
- the naive way: `share_prefill=False` (every row prefills its prompt), transformers' own top-p warper
  (an argsort of every (rows, vocab) logits tensor at every step) and `torch.multinomial` (an exponential
  draw for every vocabulary entry of every row at every step), one batch at a time (it draws from torch's
  global generator, so it cannot run batches side by side).
ratio = naive seconds / our seconds. (The arm names keep their first meaning: per_row is the naive way.)
The prompts run in chunks, the arms taking turns at going first, so drifting machine load hits all alike.
The tokens must agree exactly and the states within 1e-5 of their scale (same seed, float32 on CPU).

--quick: 8 prompts × 4 samples × 6 tokens, batch 16.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks._common import RTP_CSV, emit, log, parse_args, timed
from eigenshift_core.generation import Continuations, generate_continuations
from eigenshift_core.loading import LoadedModel, load_model
from eigenshift_core.prompts import load_prompts

NAME = "evaluation"
TARGET = ">=2"
# The states agree within 1e-5 of their largest magnitude: the shared prefill multiplies the distinct prompts'
# rows where the naive one multiplies every sample's, and with more than one thread MKL splits matmuls of
# different shapes differently, so float32 sums round in another order (0.0 at one thread).
STATE_TOLERANCE = 1e-5
FULL = {"prompts": 128, "samples": 10, "max_new_tokens": 20, "batch_size": 32, "chunk_prompts": 32}
QUICK = {"prompts": 8, "samples": 4, "max_new_tokens": 6, "batch_size": 16, "chunk_prompts": 8}
SAMPLING = {"do_sample": True, "top_p": 0.95, "temperature": 1.0, "seed": 0}


# arm -> generate_continuations switches
ARMS: dict[str, dict[str, Any]] = {
    "per_row": {"share_prefill": False, "fast_sampling": False},
    "shared": {"share_prefill": True, "fast_sampling": True},
    "shared_one_worker": {"share_prefill": True, "fast_sampling": True, "workers": 1},
}


def run_arm(lm: LoadedModel, prompts: list[str], size: dict[str, int], arm: str) -> tuple[Continuations, float]:
    return timed(lambda: generate_continuations(
        lm, prompts, samples=size["samples"], max_new_tokens=size["max_new_tokens"], batch_size=size["batch_size"],
        **ARMS[arm], **SAMPLING,
    ))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    size = QUICK if args.quick else FULL
    prompts = load_prompts(RTP_CSV, f"0:{size['prompts']}").texts
    lm, load_seconds = timed(lambda: load_model("embedded", device="cpu"))
    log(f"embedded loaded in {load_seconds:.1f}s; warm-up")
    for arm in ARMS:
        generate_continuations(lm, prompts[:2], samples=2, max_new_tokens=2, **ARMS[arm], **SAMPLING)

    seconds = dict.fromkeys(ARMS, 0.0)
    agreement = {"rows": 0, "identical_rows": 0, "max_abs_state_diff": 0.0, "max_abs_state": 0.0}
    tokens = {"generated": 0, "prompt": 0}
    step = size["chunk_prompts"]
    for number, start in enumerate(range(0, len(prompts), step)):
        chunk = prompts[start : start + step]
        order = list(ARMS)[number % len(ARMS):] + list(ARMS)[: number % len(ARMS)]
        results = {}
        for arm in order:
            results[arm], took = run_arm(lm, chunk, size, arm)
            seconds[arm] += took
        log(f"prompts {start}:{start + len(chunk)}: " + ", ".join(f"{arm} {s:.1f}s" for arm, s in seconds.items())
            + " so far")
        for arm in ("shared", "shared_one_worker"):
            compare(results["per_row"], results[arm], agreement)
        tokens["generated"] += int(results["shared"].lengths.sum())
        tokens["prompt"] += size["samples"] * sum(len(lm.tokenizer(p)["input_ids"]) for p in chunk)

    tokens_agree = agreement["identical_rows"] == agreement["rows"]
    states_agree = tokens_agree and agreement["max_abs_state_diff"] <= STATE_TOLERANCE * agreement["max_abs_state"]
    return emit(
        NAME,
        ratio=seconds["per_row"] / seconds["shared"],
        target=TARGET,
        tokens_agree=tokens_agree,
        states_agree=states_agree,
        measurements={
            **{f"{arm}_seconds": round(seconds[arm], 3) for arm in seconds},
            "ratio_one_worker": round(seconds["per_row"] / seconds["shared_one_worker"], 4),
            **{f"{arm}_{kind}": round(count / seconds[arm], 2)
               for arm in seconds
               for kind, count in (("tokens_per_s", tokens["generated"]),
                                   ("tokens_per_s_with_prompt", tokens["generated"] + tokens["prompt"]))},
            "generated_tokens": tokens["generated"],
            "prompt_tokens": tokens["prompt"],
            "load_seconds": round(load_seconds, 3),
            **agreement,
        },
        settings={
            "quick": args.quick, "model": "embedded", **size, **SAMPLING, "threads": args.threads,
            "ratio": "naive seconds (per-row prefill, argsort top-p, torch.multinomial, one batch at a time) / ours "
                     "(shared prefill, sort-free top-p, replayed draws, batches side by side); ratio_one_worker: "
                     "the same with ours on one batch at a time",
            "workers": generate_workers(),
            "tokens": "generated = tokens before the stop token; with_prompt adds every row's prompt tokens",
            "rows": "rows of both of our arms, each compared with the naive arm's",
            "state_tolerance": f"max_abs_state_diff <= {STATE_TOLERANCE:g} * max_abs_state",
        },
    )


def generate_workers() -> int:
    """How many batches ours runs side by side here: one per torch thread on a CPU (batches permitting)."""
    return torch.get_num_threads()


def compare(per_row: Continuations, shared: Continuations, into: dict[str, Any]) -> None:
    """Add this chunk's rows, identical rows (tokens and lengths) and largest state difference to `into`
    (both of our arms are compared with the naive one, so rows count twice)."""
    same = (per_row.token_ids == shared.token_ids).all(dim=1) & (per_row.lengths == shared.lengths)
    into["rows"] += len(per_row)
    into["identical_rows"] += int(same.sum())
    into["max_abs_state_diff"] = max(into["max_abs_state_diff"], float((per_row.states - shared.states).abs().max()))
    into["max_abs_state"] = max(into["max_abs_state"], float(per_row.states.abs().max()))


if __name__ == "__main__":
    main()

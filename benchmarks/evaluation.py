"""Benchmark: sampling many continuations per prompt, ours against the way it was done before.

Task: the evaluation's generation, the first 128 RealToxicityPrompts prompts × 10 samples × 20 new tokens,
sampled (top_p 0.95, T 1.0), on `embedded`, batch 32 (the steps' default). Both arms are
`generate_continuations` with the same arguments but two switches:
- ours: `share_prefill=True` (each distinct prompt of a batch prefilled once, its KV cache gathered to its
  samples) and `fast_sampling=True` (the nucleus found by sorting values only, `SortFreeTopP`, and
  torch.multinomial's draws replayed where the nucleus is, `ReplayedMultinomial`);
- the naive way: `share_prefill=False` (every row prefills its prompt), transformers' own top-p warper
  (an argsort of every (rows, vocab) logits tensor at every step) and `torch.multinomial` (an exponential
  draw for every vocabulary entry of every row at every step).
ratio = naive seconds / our seconds. (The arm names keep their first meaning: per_row is the naive way.)
The prompts run in chunks, the two arms alternating which goes first, so drifting machine load hits both
alike. The tokens must agree exactly and the states within 1e-5 of their scale (same seed, float32 on CPU).

--quick: 8 prompts × 4 samples × 6 tokens, batch 16.
"""

from __future__ import annotations

from typing import Any

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


def run_arm(lm: LoadedModel, prompts: list[str], size: dict[str, int], shared: bool) -> tuple[Continuations, float]:
    return timed(lambda: generate_continuations(
        lm, prompts, samples=size["samples"], max_new_tokens=size["max_new_tokens"], batch_size=size["batch_size"],
        share_prefill=shared, fast_sampling=shared, **SAMPLING,
    ))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    size = QUICK if args.quick else FULL
    prompts = load_prompts(RTP_CSV, f"0:{size['prompts']}").texts
    lm, load_seconds = timed(lambda: load_model("embedded", device="cpu"))
    log(f"embedded loaded in {load_seconds:.1f}s; warm-up")
    for shared in (False, True):
        generate_continuations(lm, prompts[:2], samples=2, max_new_tokens=2, share_prefill=shared,
                               fast_sampling=shared, **SAMPLING)

    seconds = {"per_row": 0.0, "shared": 0.0}
    agreement = {"rows": 0, "identical_rows": 0, "max_abs_state_diff": 0.0, "max_abs_state": 0.0}
    tokens = {"generated": 0, "prompt": 0}
    step = size["chunk_prompts"]
    for number, start in enumerate(range(0, len(prompts), step)):
        chunk = prompts[start : start + step]
        order = (False, True) if number % 2 == 0 else (True, False)
        results = {}
        for shared in order:
            results[shared], took = run_arm(lm, chunk, size, shared)
            seconds["shared" if shared else "per_row"] += took
        log(f"prompts {start}:{start + len(chunk)}: per-row {seconds['per_row']:.1f}s, shared {seconds['shared']:.1f}s so far")
        compare(results[False], results[True], agreement)
        tokens["generated"] += int(results[True].lengths.sum())
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
            "per_row_seconds": round(seconds["per_row"], 3),
            "shared_seconds": round(seconds["shared"], 3),
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
            "ratio": "naive seconds (per-row prefill, argsort top-p, torch.multinomial) / ours (shared prefill, sort-free top-p, replayed draws)",
            "tokens": "generated = tokens before the stop token; with_prompt adds every row's prompt tokens",
            "state_tolerance": f"max_abs_state_diff <= {STATE_TOLERANCE:g} * max_abs_state",
        },
    )


def compare(per_row: Continuations, shared: Continuations, into: dict[str, Any]) -> None:
    """Add this chunk's rows, identical rows (tokens and lengths) and largest state difference to `into`."""
    same = (per_row.token_ids == shared.token_ids).all(dim=1) & (per_row.lengths == shared.lengths)
    into["rows"] += len(per_row)
    into["identical_rows"] += int(same.sum())
    into["max_abs_state_diff"] = max(into["max_abs_state_diff"], float((per_row.states - shared.states).abs().max()))
    into["max_abs_state"] = max(into["max_abs_state"], float(per_row.states.abs().max()))


if __name__ == "__main__":
    main()

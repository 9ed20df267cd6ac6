"""Benchmark: capturing generation states in batches (ours) against one prompt at a time (the reference way).

Task: the first N RealToxicityPrompts prompts × 20 new tokens, greedy, on `embedded`, keeping the lm_head
input behind every generated token. Ours is `generate_continuations` (length-sorted left-padded batches);
the reference calls `model.generate` per prompt with a forward pre-hook on lm_head that keeps the last
position. Both get the same generation arguments (greedy, min_new_tokens=1, pad = EOS), so only batching
differs. ratio = reference seconds per prompt / ours seconds per prompt.

--quick: the reference runs on the first 16 prompts and ours on the first 32 in one batch of 32;
the ratio compares per-prompt throughput, which batching does not change once batches are full.
Token agreement is measured on the prompts both ran; batched float math may flip rare near-ties.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks._common import emit, log, parse_args, rtp_prompts, timed
from eigenshift_core.generation import captured_head_inputs, generate_continuations
from eigenshift_core.loading import LoadedModel, load_model

NAME = "capture"
TARGET = ">=8"
MAX_NEW_TOKENS = 20
MIN_IDENTICAL_SHARE = 0.9  # "most prompts": greedy continuations identical token for token


@torch.inference_mode()
def reference_capture(lm: LoadedModel, prompts: list[str]) -> list[tuple[list[int], torch.Tensor]]:
    """One prompt at a time: (tokens before the first stop token, states (tokens, d)) per prompt."""
    model, tokenizer = lm.model, lm.tokenizer
    stop = {int(tokenizer.eos_token_id), *_as_list(model.generation_config.eos_token_id)}
    results = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        with captured_head_inputs(model) as captured:
            output = model.generate(
                **encoded, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=1, do_sample=False,
                top_p=None, temperature=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            )
        new = output[0, encoded["input_ids"].shape[1] :].tolist()
        length = next((i for i, token in enumerate(new) if token in stop), len(new))
        results.append((new[:length], torch.cat(captured[:length]) if length else torch.zeros(0)))
    return results


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [int(i) for i in ids] if isinstance(ids, list) else [int(ids)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    n_ours, n_reference, batch_sizes = (32, 16, (32,)) if args.quick else (256, 256, (32, 64))
    prompts = rtp_prompts(max(n_ours, n_reference))
    lm, load_seconds = timed(lambda: load_model("embedded", device="cpu"))
    log(f"embedded loaded in {load_seconds:.1f}s; warm-up")
    generate_continuations(lm, prompts[:2], max_new_tokens=2, batch_size=2)
    reference_capture(lm, prompts[:1])

    ours_seconds: dict[int, float] = {}
    ours_result = None
    for batch_size in batch_sizes:
        result, seconds = timed(
            lambda b=batch_size: generate_continuations(lm, prompts[:n_ours], max_new_tokens=MAX_NEW_TOKENS, batch_size=b)
        )
        log(f"ours, batch {batch_size}: {seconds:.1f}s for {n_ours} prompts")
        ours_seconds[batch_size] = seconds
        if seconds <= min(ours_seconds.values()):
            ours_result = result
    best_batch = min(ours_seconds, key=ours_seconds.__getitem__)
    assert ours_result is not None
    reference, reference_seconds = timed(lambda: reference_capture(lm, prompts[:n_reference]))
    log(f"reference: {reference_seconds:.1f}s for {n_reference} prompts")

    per_prompt_ours = ours_seconds[best_batch] / n_ours
    per_prompt_reference = reference_seconds / n_reference
    agreement = compare(ours_result, reference)
    return emit(
        NAME,
        ratio=per_prompt_reference / per_prompt_ours,
        target=TARGET,
        tokens_agree=agreement["identical_share"] >= MIN_IDENTICAL_SHARE,
        measurements={
            "ours_seconds_by_batch_size": {str(b): round(s, 3) for b, s in ours_seconds.items()},
            "best_batch_size": best_batch,
            "reference_seconds": round(reference_seconds, 3),
            "ours_seconds_per_prompt": round(per_prompt_ours, 4),
            "reference_seconds_per_prompt": round(per_prompt_reference, 4),
            "ours_tokens": int(ours_result.lengths.sum()),
            "reference_tokens": sum(len(tokens) for tokens, _ in reference),
            "load_seconds": round(load_seconds, 3),
            **agreement,
        },
        settings={
            "quick": args.quick, "model": "embedded", "prompts_ours": n_ours, "prompts_reference": n_reference,
            "batch_sizes_tried": list(batch_sizes), "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
            "ratio": "reference seconds per prompt / ours seconds per prompt (best batch size)",
            "min_identical_share": MIN_IDENTICAL_SHARE, "threads": args.threads,
        },
    )


def compare(ours: Any, reference: list[tuple[list[int], torch.Tensor]]) -> dict[str, Any]:
    """Share of prompts whose continuations are identical, and how far their states are apart."""
    identical, state_diff = 0, 0.0
    for row, (tokens, states) in enumerate(reference):
        if ours.row_tokens(row).tolist() != tokens:
            continue
        identical += 1
        if tokens:
            state_diff = max(state_diff, float((ours.row_states(row) - states).abs().max()))
    return {
        "compared_prompts": len(reference),
        "identical_continuations": identical,
        "identical_share": round(identical / len(reference), 4),
        "max_abs_state_diff_identical": state_diff,
    }


if __name__ == "__main__":
    main()

"""Benchmark: generation throughput with an intervention hooked into lm_head against none.

Task: 16 RealToxicityPrompts prompts × 20 new tokens, greedy, one batch, on `embedded`, through
`generate_continuations`. The intervention damps k = 32 random orthonormal directions (α = 0.5), so the
hook does its full work (two (batch, d) × (d, k) products per step). Runs alternate off/on (the order
flips every pair, so drift hits both arms alike); the medians are compared.

Throughput counts the token positions the model actually computed: generation stops when every row has
hit EOS, so each run computed batch × steps tokens with steps = min(max_new_tokens, longest row + 1).
The tokens kept before EOS are reported too. ratio = median tokens/s on / median tokens/s off.
"""

from __future__ import annotations

import torch

from benchmarks._common import emit, log, median, parse_args, rtp_prompts, timed
from eigenshift_core.generation import generate_continuations
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, load_model

NAME = "overhead"
TARGET = ">=0.98"
BATCH = 16
MAX_NEW_TOKENS = 20
K = 32
ALPHA = 0.5


def random_intervention(d: int, k: int, *, alpha: float, seed: int = 0) -> Intervention:
    """k random orthonormal directions (rows of the Q of a Gaussian (d, k)), all damped by α."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator))  # (d, k) orthonormal columns
    return Intervention(
        directions=q.T.contiguous(), alphas=torch.full((k,), alpha), singular_values=torch.zeros(k),
        indices=torch.arange(k), delta=torch.zeros(d), scores=torch.zeros(d), info={"source": "random"},
    )


def one_run(lm: LoadedModel, prompts: list[str], intervention: Intervention | None) -> dict[str, float]:
    result, seconds = timed(
        lambda: generate_continuations(
            lm, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts), intervention=intervention
        )
    )
    steps = min(MAX_NEW_TOKENS, int(result.lengths.max()) + 1)
    computed = len(prompts) * steps
    return {"seconds": seconds, "computed_tokens": computed, "kept_tokens": int(result.lengths.sum()),
            "tokens_per_second": computed / seconds}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    pairs = 3 if args.quick else 9
    prompts = rtp_prompts(BATCH)
    lm = load_model("embedded", device="cpu")
    intervention = random_intervention(lm.lm_head.in_features, K, alpha=ALPHA)
    log("warm-up")
    for warm in (None, intervention):
        generate_continuations(lm, prompts, max_new_tokens=4, batch_size=BATCH, intervention=warm)

    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for pair in range(pairs):
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        for arm in order:
            runs[arm].append(one_run(lm, prompts, intervention if arm == "on" else None))
        log(f"pair {pair + 1}/{pairs}: off {runs['off'][-1]['seconds']:.2f}s, on {runs['on'][-1]['seconds']:.2f}s")

    tps = {arm: median([r["tokens_per_second"] for r in arm_runs]) for arm, arm_runs in runs.items()}
    kept_tps = {arm: median([r["kept_tokens"] / r["seconds"] for r in arm_runs]) for arm, arm_runs in runs.items()}
    pair_ratios = [on["tokens_per_second"] / off["tokens_per_second"] for on, off in zip(runs["on"], runs["off"], strict=True)]
    return emit(
        NAME,
        ratio=tps["on"] / tps["off"],
        target=TARGET,
        measurements={
            "tokens_per_second_off": round(tps["off"], 3),
            "tokens_per_second_on": round(tps["on"], 3),
            "kept_tokens_per_second_off": round(kept_tps["off"], 3),
            "kept_tokens_per_second_on": round(kept_tps["on"], 3),
            "median_pair_ratio": round(median(pair_ratios), 4),
            "seconds_off": [round(r["seconds"], 3) for r in runs["off"]],
            "seconds_on": [round(r["seconds"], 3) for r in runs["on"]],
            "computed_tokens_off": [r["computed_tokens"] for r in runs["off"]],
            "computed_tokens_on": [r["computed_tokens"] for r in runs["on"]],
            "kept_tokens_off": [r["kept_tokens"] for r in runs["off"]],
            "kept_tokens_on": [r["kept_tokens"] for r in runs["on"]],
        },
        settings={
            "quick": args.quick, "model": "embedded", "batch": BATCH, "max_new_tokens": MAX_NEW_TOKENS,
            "greedy": True, "k": K, "alpha": ALPHA, "directions": "random orthonormal, seed 0", "pairs": pairs,
            "order": "off/on alternating, flipped every pair", "statistic": "median tokens/s per arm",
            "threads": args.threads,
        },
    )


if __name__ == "__main__":
    main()

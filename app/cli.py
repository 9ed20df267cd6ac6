"""`eigenshift serve`: the API, one worker and (without a Redis URL) a Redis on a unix socket, in one
command. Every other subcommand is the core CLI's."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from eigenshift_core.cli import main as core_main


def build_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenshift serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, default=None, help="Redis socket, artifacts and work files")
    parser.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    return parser


def worker_command(settings_queue: str) -> list[str]:
    """One solo worker process: CUDA cannot be forked, and the model is loaded once in it."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo", "-c", "1",
            "-Q", settings_queue, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


class WorkerKeeper:
    """Embedded mode: the one worker process, started again (after a short pause) whenever it dies."""

    def __init__(self, command: list[str], *, pause_s: float = 1.0) -> None:
        self.command, self.pause_s = command, pause_s
        self.process = subprocess.Popen(command, env=os.environ.copy())
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="eigenshift-worker-keeper", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.pause_s):
            if self.process.poll() is not None and not self._stopping.is_set():
                print(f"eigenshift: worker exited with {self.process.returncode}; starting another", file=sys.stderr)
                self.process = subprocess.Popen(self.command, env=os.environ.copy())
                self.restarts += 1

    def stop(self, timeout_s: float = 20) -> None:
        self._stopping.set()
        self._thread.join()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(argv: Sequence[str]) -> int:
    import uvicorn

    from workers.redis_server import start_redis_server
    from workers.settings import Settings, get_settings

    args = build_serve_parser().parse_args(argv)
    if args.data_dir is not None:
        os.environ["EIGENSHIFT_DATA_DIR"] = str(args.data_dir.resolve())
    get_settings.cache_clear()
    settings: Settings = get_settings()
    children: list[subprocess.Popen[bytes]] = []
    keeper: WorkerKeeper | None = None
    try:
        if settings.redis_url is None:
            process, url = start_redis_server(settings.data_dir)
            children.append(process)
            os.environ["EIGENSHIFT_REDIS_URL"] = url
            get_settings.cache_clear()
            settings = get_settings()
        if settings.admin_key_file:
            from app.api.auth import ensure_admin_key

            key, created = ensure_admin_key(settings.api_key_path)
            if created:
                print(f"eigenshift: generated admin API key (kept in {settings.api_key_path}):\n  {key}", flush=True)
        if not args.no_worker:
            keeper = WorkerKeeper(worker_command(settings.queue))
        from app.main import create_app

        # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would kill
        # this process before `finally` stops the worker and Redis, leaving them orphaned.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        if keeper is not None:
            keeper.stop()
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`eigenshift serve …` here; anything else goes to the core CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    return core_main(args)


if __name__ == "__main__":
    sys.exit(main())

"""`eigenshift serve`: the API, one worker and (without a Redis URL) a Redis on a unix socket, in one
command. Every other subcommand is the core CLI's."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
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
    try:
        if settings.redis_url is None:
            process, url = start_redis_server(settings.data_dir)
            children.append(process)
            os.environ["EIGENSHIFT_REDIS_URL"] = url
            get_settings.cache_clear()
            settings = get_settings()
        if not args.no_worker:
            children.append(subprocess.Popen(worker_command(settings.queue), env=os.environ.copy()))
        from app.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
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

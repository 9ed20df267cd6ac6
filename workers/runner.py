"""How a task runs one step of a job: skip what is done, record progress, errors and artifacts.

A step writes into a fresh local directory; the runner uploads it to `jobs/<id>/<step>/` and then marks
the step done, so a task that runs twice (a redelivery after a lost worker) redoes or skips the step
and never leaves a half-recorded one. A failed step keeps every earlier step's artifacts.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from eigenshift_core.errors import InputError
from eigenshift_core.loading import DEFAULT_CACHE_DIR, LoadedModel, load_model
from eigenshift_core.progress import Cancelled, StepHooks
from workers.interventions import InterventionRegistry
from workers.jobs import TERMINAL, JobError, JobRecord, JobStore, connect, now
from workers.models import ModelGrant, grant_model
from workers.settings import Settings, get_settings
from workers.specs import SPECS, JobSpec
from workers.store import ArtifactStore, open_store, put_dir
from workers.webhooks import queue_notification

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def cached_model(grant: ModelGrant, device: str, dtype: str, cache_dir: Path) -> LoadedModel:
    """One copy of each model per worker process, loaded on first use, as its allowlist entry permits."""
    return load_model(grant.model_id, device=device, dtype=dtype, cache_dir=cache_dir,  # type: ignore[arg-type]
                      revision=grant.revision, trust_remote_code=grant.trust_remote_code)


@dataclass
class StepResult:
    intervention_id: str | None = None


class LeaseLost(Exception):
    """This task's lease on the job expired or was taken (a redelivered twin runs the step now): stop
    without touching the job's record or artifacts, which are the twin's now."""


@dataclass
class StepContext:
    """What a step function gets: its job, its spec, a directory to write, the model and the services."""

    settings: Settings
    jobs: JobStore
    store: ArtifactStore
    interventions: InterventionRegistry
    record: JobRecord
    spec: JobSpec
    out: Path
    scratch: Path
    last_progress: dict[str, int] = field(default_factory=dict)
    lease_lost: threading.Event = field(default_factory=threading.Event)

    @property
    def job_id(self) -> str:
        return self.record.id

    def lm(self) -> LoadedModel:
        s = self.settings
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        return cached_model(grant_model(s, self.spec.model), s.device, s.dtype, s.cache_dir or DEFAULT_CACHE_DIR)

    def progress(self, stage: str, done: int, total: int, unit: str | None = None) -> None:
        def change(record: JobRecord) -> None:
            record.progress.stage, record.progress.done, record.progress.total = stage, done, total
            record.progress.unit = unit

        self.jobs.update(self.job_id, change)

    def hooks(self) -> StepHooks:
        """The core's progress and stop hooks, wired to this job's record."""
        return StepHooks(on_progress=self.progress, should_stop=self.should_stop)

    def should_stop(self) -> bool:
        """True when the job was cancelled; raises `JobTimeLimit` once it has run longer than `job_timeout_s`
        (the time limit, enforced at every batch: `-P solo` has no task time limit) and `LeaseLost` once
        this task no longer holds the job's lease."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"the lease of job {self.job_id} was lost: another task runs this step now")
        record = self.jobs.get(self.job_id)
        check_time_limit(record, self.settings.job_timeout_s)
        return record.cancel_requested

    def fetch(self, key: str, name: str) -> Path:
        """A file of the store in this step's scratch directory."""
        try:
            return self.store.get_file(key, self.scratch / name)
        except FileNotFoundError:
            raise InputError(f"missing artifact {key}", field="job") from None


StepFunction = Callable[[StepContext], StepResult]


class JobTimeLimit(Exception):
    """The job ran longer than `job_timeout_s`: it fails with this reason."""


def check_time_limit(record: JobRecord, limit_s: float) -> None:
    if record.started_at is not None and (now() - record.started_at).total_seconds() > limit_s:
        raise JobTimeLimit(f"the job ran longer than job_timeout_s={limit_s:g} seconds")


def services(settings: Settings) -> tuple[JobStore, ArtifactStore, InterventionRegistry]:
    client = connect(settings)
    store = open_store(settings)
    return JobStore(client, settings.key_prefix), store, InterventionRegistry(client, store, settings.key_prefix)


RUNNING_ELSEWHERE = "skipped: running elsewhere"
ABANDONED = "abandoned: lease lost"


def run_step(job_id: str, step: str, function: StepFunction, settings: Settings | None = None, *,
             enqueue_next: Callable[[JobRecord], None] | None = None) -> str:
    """Run `step` of `job_id` unless the job is over, the step is done or another task holds the job's lease;
    returns what happened. The lease is renewed while the step runs, so a dead worker's job can be found."""
    settings = settings or get_settings()
    jobs, store, interventions = services(settings)
    holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if not jobs.claim(job_id, holder, settings.lease_s):
        return RUNNING_ELSEWHERE
    every_s = min(settings.heartbeat_s, settings.lease_s / 3)
    stranded = threading.Event()  # the next step could not be queued: keep the job in flight for the reaper
    with step_lease(jobs, job_id, holder, ttl_s=settings.lease_s, every_s=every_s, keep=stranded.is_set) as lost:
        return _run_claimed(job_id, step, function, settings, jobs, store, interventions, holder, lost,
                            enqueue_next, stranded)


@contextmanager
def step_lease(jobs: JobStore, job_id: str, holder: str, *, ttl_s: float, every_s: float,
               keep: Callable[[], bool] = lambda: False) -> Iterator[threading.Event]:
    """Renew the job's lease from a daemon thread while the block runs; released on the way out unless
    `keep()` (then it expires on its own and the reaper requeues the job). Yields an event that is set once
    a renewal finds the lease gone (expired, or another task's)."""
    stop, lost = threading.Event(), threading.Event()

    def renew() -> None:
        while not stop.wait(every_s):
            try:
                if not jobs.renew(job_id, holder, ttl_s):
                    log.warning("lost the lease of job %s: stopping at the next batch", job_id)
                    lost.set()
                    return
            except Exception:  # Redis away for a moment: the next beat tries again
                log.warning("could not renew the lease of job %s", job_id, exc_info=True)

    thread = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
        try:
            if not keep():
                jobs.release(job_id, holder)
        except Exception:  # the lease expires on its own; the reaper then finds a finished job and drops it
            log.warning("could not release the lease of job %s", job_id, exc_info=True)


def _run_claimed(job_id: str, step: str, function: StepFunction, settings: Settings, jobs: JobStore,
                 store: ArtifactStore, interventions: InterventionRegistry, holder: str, lost: threading.Event,
                 enqueue_next: Callable[[JobRecord], None] | None, stranded: threading.Event) -> str:
    record = jobs.get(job_id)
    if record.state in TERMINAL:
        queue_notification(jobs, job_id)  # a job cancelled while queued ends here (once per job)
        return f"skipped: job {record.state}"
    if step in record.steps_done:
        return "skipped: step done"
    if record.cancel_requested:
        _finish(jobs, job_id, "cancelled")
        return "cancelled"

    def start(r: JobRecord) -> None:
        r.state, r.started_at = "running", r.started_at or now()
        r.progress.stage, r.progress.done, r.progress.total = step, 0, 0

    record = jobs.update(job_id, start)
    try:  # a redelivered step of a job that is already over its time
        check_time_limit(record, settings.job_timeout_s)
    except JobTimeLimit as error:
        _finish(jobs, job_id, "failed", error=JobError(type="JobTimeLimit", message=str(error)))
        return "failed"
    base = settings.work_dir / job_id / f"{step}-{holder}"  # a zombie twin never shares its files with us
    shutil.rmtree(base, ignore_errors=True)
    ctx = StepContext(settings, jobs, store, interventions, record, SPECS[record.kind].model_validate(record.params),
                      base / "out", base / "scratch", lease_lost=lost)
    ctx.out.mkdir(parents=True)
    ctx.scratch.mkdir(parents=True)
    try:
        result = function(ctx)
    except LeaseLost:
        log.warning("job %s step %s abandoned: its lease went to another task", job_id, step)
        shutil.rmtree(base, ignore_errors=True)
        return ABANDONED
    except Cancelled:
        _finish(jobs, job_id, "cancelled", _upload(ctx, step))
        shutil.rmtree(base, ignore_errors=True)
        return "cancelled"
    except Exception as error:
        if not isinstance(error, InputError):
            log.exception("job %s step %s failed", job_id, step)
        _finish(jobs, job_id, "failed", _upload(ctx, step), JobError(type=type(error).__name__, message=str(error)))
        shutil.rmtree(base, ignore_errors=True)
        return "failed"
    finally:
        shutil.rmtree(base / "scratch", ignore_errors=True)
    try:  # the step's outputs must reach the store, or the job did not succeed
        names = [f"{step}/{name}" for name in put_dir(ctx.store, f"jobs/{ctx.job_id}/{step}", ctx.out)]
    except Exception as error:
        log.exception("upload of job %s step %s failed", job_id, step)
        _finish(jobs, job_id, "failed", error=JobError(
            type="ArtifactStoreError", message=f"could not store the {step} step's artifacts: {error}"))
        return "failed"

    def done(r: JobRecord) -> None:
        if step not in r.steps_done:  # a zombie task that outlived its lease may finish the same step late
            r.steps_done.append(step)
        r.artifacts = sorted(set(r.artifacts) | set(names))
        r.intervention_id = result.intervention_id or r.intervention_id
        if all(s in r.steps_done for s in r.steps):
            r.state, r.finished_at = "succeeded", now()

    record = jobs.update(job_id, done)
    if record.state == "running" and enqueue_next is not None:  # more steps: queue the next while leased
        try:
            enqueue_next(record)
        except Exception:
            log.exception("could not queue the next step of job %s: its lease will expire and it is requeued", job_id)
            stranded.set()
    queue_notification(jobs, job_id)  # the job's webhook, when that was its last step
    shutil.rmtree(base, ignore_errors=True)
    return "done"


def _upload(ctx: StepContext, step: str) -> list[str]:
    """Upload what the step wrote (also after a failure: partial outputs help the diagnosis)."""
    try:
        return [f"{step}/{name}" for name in put_dir(ctx.store, f"jobs/{ctx.job_id}/{step}", ctx.out)]
    except Exception:
        log.exception("upload of job %s step %s failed", ctx.job_id, step)
        return []


def _finish(jobs: JobStore, job_id: str, state: str, names: list[str] | None = None,
            error: JobError | None = None) -> None:
    def change(r: JobRecord) -> None:
        r.state, r.finished_at, r.error = state, now(), error  # type: ignore[assignment]
        r.artifacts = sorted(set(r.artifacts) | set(names or []))

    jobs.update(job_id, change)
    queue_notification(jobs, job_id)

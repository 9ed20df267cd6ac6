"""The reapers every worker runs from its heartbeat thread; both are idempotent, so several workers reaping
at once act on each job once.

- Lost steps: a job in flight whose lease expired lost its worker (SIGKILL, OOM, power). It goes back to
  `queued` with its remaining steps requeued, or after `max_attempts` runs ends `failed` with the reason:
  never stuck `running`.
- Retention: finished jobs older than `job_retention_s` lose their record and their artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from workers.jobs import JobError, JobNotFound, JobRecord, JobStore, now
from workers.store import ArtifactStore

FINISHED = ("succeeded", "failed", "cancelled")


def reap_expired(jobs: JobStore, store: ArtifactStore, *, retention_s: float,
                 at: datetime | None = None) -> list[str]:
    """Delete finished jobs that ended more than `retention_s` before `at` (default now); their ids."""
    cutoff = (at or now()) - timedelta(seconds=retention_s)
    expired = [r.id for r in jobs.finished_before(cutoff) if (r.finished_at or r.created_at) < cutoff]
    for job_id in expired:
        store.delete_prefix(f"jobs/{job_id}")  # artifacts first: a record never points at deleted files
        jobs.delete(job_id)
    return expired


def requeue_lost(jobs: JobStore, enqueue: Callable[[JobRecord], None], notify: Callable[[str], object], *,
                 max_attempts: int) -> dict[str, str]:
    """Requeue or fail each job whose step lost its worker; {job id: "requeued" | "failed" | "cancelled"}.
    `enqueue` queues a requeued job's remaining steps; `notify` queues the webhook of a job that ended here
    (the worker passes `workers.celery_app`'s functions, so this module imports no queue)."""
    outcomes: dict[str, str] = {}
    for job_id in jobs.in_flight_without_lease():
        outcome: str | None = None

        def change(r: JobRecord) -> None:
            nonlocal outcome
            if r.state != "running":  # it ended, or another reaper got to it first
                outcome = None
                return
            r.worker_losses += 1
            if r.cancel_requested:
                r.state, r.finished_at, outcome = "cancelled", now(), "cancelled"
            elif r.worker_losses >= max_attempts:
                r.state, r.finished_at, outcome = "failed", now(), "failed"
                r.error = JobError(type="WorkerLost", message=(
                    f"the worker running step {r.progress.stage!r} died {r.worker_losses} times "
                    f"(max_attempts={max_attempts})"))
            else:
                r.state, outcome = "queued", "requeued"

        try:
            record = jobs.update(job_id, change)
        except JobNotFound:
            record = None
        jobs.forget_in_flight(job_id)
        if record is not None and outcome == "requeued":
            enqueue(record)
        elif outcome is not None:
            notify(job_id)
        if outcome is not None:
            outcomes[job_id] = outcome
    return outcomes

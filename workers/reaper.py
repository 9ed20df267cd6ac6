"""Retention: finished jobs (succeeded, failed, cancelled) older than `job_retention_s` lose their record and
their artifacts. Every worker runs it from its heartbeat thread every `reap_interval_s`; it is idempotent,
so several workers reaping at once delete each job once."""

from __future__ import annotations

from datetime import datetime, timedelta

from workers.jobs import JobStore, now
from workers.store import ArtifactStore

FINISHED = ("succeeded", "failed", "cancelled")


def reap_expired(jobs: JobStore, store: ArtifactStore, *, retention_s: float,
                 at: datetime | None = None) -> list[str]:
    """Delete finished jobs that ended more than `retention_s` before `at` (default now); their ids."""
    cutoff = (at or now()) - timedelta(seconds=retention_s)
    records, _ = jobs.list(limit=10**9)
    expired = [r.id for r in records if r.state in FINISHED and (r.finished_at or r.created_at) < cutoff]
    for job_id in expired:
        store.delete_prefix(f"jobs/{job_id}")  # artifacts first: a record never points at deleted files
        jobs.delete(job_id)
    return expired

"""Retention: expired finished jobs lose record and artifacts; running, queued and recent jobs stay."""

from __future__ import annotations

from datetime import timedelta

from workers.jobs import JobRecord, JobStore, connect, now
from workers.reaper import reap_expired
from workers.settings import Settings
from workers.store import LocalStore


def _job(jobs: JobStore, store: LocalStore, state: str, age_s: float) -> str:
    record, _ = jobs.create("generate", {}, ["generate"])

    def change(r: JobRecord) -> None:
        r.state = state  # type: ignore[assignment]
        r.finished_at = now() - timedelta(seconds=age_s) if state != "running" else None
        r.created_at = now() - timedelta(seconds=age_s)

    jobs.update(record.id, change)
    store.put_bytes(f"jobs/{record.id}/generate/out.json", b"{}")
    return record.id


def test_reaper_deletes_only_expired_finished_jobs(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    store = LocalStore(worker_settings.artifacts_dir)
    old = [_job(jobs, store, state, 7200) for state in ("succeeded", "failed", "cancelled")]
    kept = [_job(jobs, store, "succeeded", 10), _job(jobs, store, "running", 7200)]
    assert sorted(reap_expired(jobs, store, retention_s=3600)) == sorted(old)
    remaining = {r.id for r in jobs.list(limit=100)[0]}
    assert remaining == set(kept)
    for job_id in old:
        assert not store.exists(f"jobs/{job_id}/generate/out.json")
    for job_id in kept:
        assert store.exists(f"jobs/{job_id}/generate/out.json")
    assert reap_expired(jobs, store, retention_s=3600) == []  # idempotent

"""Retention: expired finished jobs lose record and artifacts; running, queued and recent jobs stay."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from workers.jobs import JobRecord, JobStore, connect, now
from workers.reaper import reap_expired, requeue_lost
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


# -- lost steps ------------------------------------------------------------------------------------------------


def _in_flight(jobs: JobStore, steps: list[str], *, lease_s: float = 0.05) -> str:
    """A job whose step started under a lease that then stopped being renewed (its worker died)."""
    record, _ = jobs.create("pipeline", {}, steps)
    assert jobs.claim(record.id, "dead-worker", lease_s)
    jobs.update(record.id, lambda r: setattr(r, "state", "running"))
    return record.id


def _expire() -> None:
    time.sleep(0.15)


def test_a_lost_step_is_requeued_then_fails_after_max_attempts(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    job_id = _in_flight(jobs, ["extract", "reconstruct"])
    jobs.update(job_id, lambda r: r.steps_done.append("extract"))
    queued: list[list[str]] = []
    notified: list[str] = []

    def enqueue(record: JobRecord) -> None:
        queued.append([s for s in record.steps if s not in record.steps_done])

    _expire()
    assert requeue_lost(jobs, enqueue, notified.append, max_attempts=2) == {job_id: "requeued"}
    record = jobs.get(job_id)
    assert record.state == "queued" and record.worker_losses == 1 and queued == [["reconstruct"]] and not notified
    assert requeue_lost(jobs, enqueue, notified.append, max_attempts=2) == {}  # once handled, never twice

    assert jobs.claim(job_id, "second-worker", 0.05)  # the requeued step starts and its worker dies too
    jobs.update(job_id, lambda r: setattr(r, "state", "running"))
    _expire()
    assert requeue_lost(jobs, enqueue, notified.append, max_attempts=2) == {job_id: "failed"}
    record = jobs.get(job_id)
    assert record.state == "failed" and record.finished_at is not None and len(queued) == 1
    assert notified == [job_id]  # the job ended here: its webhook is queued
    assert record.error is not None and record.error.type == "WorkerLost" and "2 times" in record.error.message
    assert jobs.in_flight_without_lease() == []


def test_live_leases_finished_jobs_and_cancels(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    alive = _in_flight(jobs, ["generate"], lease_s=60)
    finished = _in_flight(jobs, ["generate"])
    jobs.update(finished, lambda r: setattr(r, "state", "succeeded"))
    cancelled = _in_flight(jobs, ["generate"])
    jobs.update(cancelled, lambda r: setattr(r, "cancel_requested", True))
    _expire()
    notified: list[str] = []
    outcomes = requeue_lost(jobs, lambda record: pytest.fail("nothing is requeued"), notified.append, max_attempts=3)
    assert outcomes == {cancelled: "cancelled"} and notified == [cancelled]
    assert jobs.get(alive).state == "running" and jobs.get(finished).state == "succeeded"
    assert jobs.get(cancelled).state == "cancelled"
    assert jobs.in_flight_without_lease() == []  # the finished one left the set without changing


def test_only_the_holder_renews_or_releases_a_lease(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    record, _ = jobs.create("generate", {}, ["generate"])
    assert jobs.claim(record.id, "a", 60) and not jobs.claim(record.id, "b", 60)
    assert not jobs.renew(record.id, "b", 60)
    jobs.release(record.id, "b")
    assert not jobs.claim(record.id, "c", 60)  # b's release did nothing
    jobs.release(record.id, "a")
    assert jobs.claim(record.id, "c", 60)


def test_a_late_release_keeps_the_in_flight_mark_of_the_task_that_took_the_lease(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    record, _ = jobs.create("generate", {}, ["generate"])
    assert jobs.claim(record.id, "a", 60)
    jobs.redis.delete(jobs._lease(record.id))  # a's lease expired (a hung) ...
    assert jobs.claim(record.id, "b", 60)  # ... and a redelivered twin took the job
    jobs.release(record.id, "a")  # a's step ends after all
    assert jobs.redis.get(jobs._lease(record.id)) == "b" and jobs.in_flight_without_lease() == []
    jobs.redis.delete(jobs._lease(record.id))  # b dies: its lease expires too
    assert jobs.in_flight_without_lease() == [record.id]  # so the reaper finds the job
    jobs.release(record.id, "b")
    assert jobs.in_flight_without_lease() == [] and not jobs.redis.sismember(jobs._running, record.id)

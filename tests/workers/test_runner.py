"""The runner around every task: skip what is done, record errors, keep artifacts, honour cancels."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eigenshift_core.errors import InputError
from eigenshift_core.progress import Cancelled
from workers.jobs import JobRecord, JobStore, connect
from workers.runner import ABANDONED, RUNNING_ELSEWHERE, StepContext, StepResult, run_step
from workers.settings import Settings
from workers.store import open_store


def _job(settings: Settings, steps: list[str]) -> str:
    record, _ = JobStore(connect(settings), settings.key_prefix).create("pipeline", {
        "prompts": {"texts": ["a"]}, "train_rows": "0:1", "eval_rows": "0:1"}, steps)
    return record.id


def _writes(name: str, *, fail: Exception | None = None):  # noqa: ANN202
    calls: list[str] = []

    def step(ctx: StepContext) -> StepResult:
        calls.append(ctx.job_id)
        (ctx.out / name).write_text("partial")
        ctx.progress("extract", 1, 2)
        if fail is not None:
            raise fail
        return StepResult(intervention_id=ctx.job_id if name == "intervention.json" else None)

    return step, calls


def test_a_step_that_runs_twice_runs_once(worker_settings: Settings) -> None:
    job_id = _job(worker_settings, ["extract", "reconstruct"])
    step, calls = _writes("states.safetensors")
    assert run_step(job_id, "extract", step, worker_settings) == "done"
    assert run_step(job_id, "extract", step, worker_settings) == "skipped: step done"
    assert len(calls) == 1
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    assert jobs.get(job_id).state == "running"  # one step of two
    step, _ = _writes("intervention.json")
    run_step(job_id, "reconstruct", step, worker_settings)
    record = jobs.get(job_id)
    assert record.state == "succeeded" and record.intervention_id == job_id and record.finished_at
    assert record.artifacts == ["extract/states.safetensors", "reconstruct/intervention.json"]


def test_a_failure_is_recorded_and_earlier_artifacts_stay(worker_settings: Settings) -> None:
    job_id = _job(worker_settings, ["extract", "reconstruct", "evaluate"])
    run_step(job_id, "extract", _writes("states.safetensors")[0], worker_settings)
    assert run_step(job_id, "reconstruct", _writes("half.json", fail=InputError("k too big", field="k"))[0],
                    worker_settings) == "failed"
    record = JobStore(connect(worker_settings), worker_settings.key_prefix).get(job_id)
    assert record.state == "failed" and record.error and record.error.type == "InputError"
    assert record.error.message == "k too big"
    assert set(record.artifacts) == {"extract/states.safetensors", "reconstruct/half.json"}
    assert open_store(worker_settings).exists(f"jobs/{job_id}/extract/states.safetensors")
    # The chain's next task finds the job over and does nothing.
    step, calls = _writes("report.json")
    assert run_step(job_id, "evaluate", step, worker_settings) == "skipped: job failed" and not calls


def test_cancel_before_and_during_a_step(worker_settings: Settings) -> None:
    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    job_id = _job(worker_settings, ["extract"])
    jobs.update(job_id, lambda r: setattr(r, "cancel_requested", True))
    step, calls = _writes("states.safetensors")
    assert run_step(job_id, "extract", step, worker_settings) == "cancelled" and not calls
    assert jobs.get(job_id).state == "cancelled"

    job_id = _job(worker_settings, ["extract"])
    assert run_step(job_id, "extract", _writes("x.json", fail=Cancelled("stop"))[0], worker_settings) == "cancelled"
    assert jobs.get(job_id).state == "cancelled" and jobs.get(job_id).error is None


def test_workers_never_import_the_app() -> None:
    code = ("import sys, workers.tasks, workers.job_service, workers.celery_app; "
            "bad = sorted(m for m in sys.modules if m == 'app' or m.startswith('app.') or m == 'fastapi'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_job_over_its_time_limit_fails_with_the_reason(worker_settings: Settings) -> None:
    from datetime import timedelta

    from workers.jobs import now

    jobs = JobStore(connect(worker_settings), worker_settings.key_prefix)
    job_id = _job(worker_settings, ["extract"])
    limit = worker_settings.job_timeout_s
    jobs.update(job_id, lambda r: setattr(r, "started_at", now() - timedelta(seconds=limit + 1)))
    step, calls = _writes("states.safetensors")
    assert run_step(job_id, "extract", step, worker_settings) == "failed" and not calls
    record = jobs.get(job_id)
    assert record.error and record.error.type == "JobTimeLimit" and "job_timeout_s" in record.error.message

    job_id = _job(worker_settings, ["extract"])

    def slow(ctx: StepContext) -> StepResult:
        jobs.update(ctx.job_id, lambda r: setattr(r, "started_at", now() - timedelta(seconds=limit + 1)))
        ctx.should_stop()  # what the core calls between batches
        return StepResult()

    assert run_step(job_id, "extract", slow, worker_settings) == "failed"
    assert jobs.get(job_id).error.type == "JobTimeLimit"  # type: ignore[union-attr]


def test_artifact_store_failure_fails_the_job_and_keeps_earlier_artifacts(worker_settings: Settings,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.store import LocalStore

    job_id = _job(worker_settings, ["extract", "reconstruct"])
    assert run_step(job_id, "extract", _writes("states.safetensors")[0], worker_settings) == "done"
    store = open_store(worker_settings)
    before = store.read_bytes(f"jobs/{job_id}/extract/states.safetensors")

    def disk_full(self: LocalStore, key: str, path: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalStore, "put_file", disk_full)
    monkeypatch.setattr(LocalStore, "put_bytes", disk_full)
    assert run_step(job_id, "reconstruct", _writes("intervention.json")[0], worker_settings) == "failed"
    record = JobStore(connect(worker_settings), worker_settings.key_prefix).get(job_id)
    assert record.state == "failed" and record.error and record.error.type == "ArtifactStoreError"
    assert "No space left on device" in record.error.message
    assert record.artifacts == ["extract/states.safetensors"]
    assert store.read_bytes(f"jobs/{job_id}/extract/states.safetensors") == before


def test_a_step_holds_its_lease_while_it_runs_and_a_duplicate_is_turned_away(worker_settings: Settings) -> None:
    """The step outlives several lease periods; meanwhile a second delivery of the same job cannot start it."""
    settings = worker_settings.model_copy(update={"lease_s": 0.3, "heartbeat_s": 0.05})
    jobs = JobStore(connect(settings), settings.key_prefix)
    job_id = _job(settings, ["extract"])
    seen: list[str] = []

    def slow(ctx: StepContext) -> StepResult:
        time.sleep(1.0)  # > 3 leases: only renewal keeps it
        seen.append(run_step(job_id, "extract", _writes("other.json")[0], settings))
        assert jobs.in_flight_without_lease() == []
        return StepResult()

    assert run_step(job_id, "extract", slow, settings) == "done"
    assert seen == [RUNNING_ELSEWHERE]
    assert jobs.claim(job_id, "after", 1)  # released at the end


def _polls_should_stop(seen: list[Path]):  # noqa: ANN202
    """A step that keeps asking whether to stop, as the core's steps do after every batch."""

    def step(ctx: StepContext) -> StepResult:
        seen.append(ctx.out)
        (ctx.out / "partial.json").write_text("{}")
        deadline = time.monotonic() + 60  # only ends a hung test; the outcome never depends on it
        while time.monotonic() < deadline:
            ctx.should_stop()
            time.sleep(0.05)
        return StepResult()

    return step


def test_a_step_that_loses_its_lease_stops_and_leaves_the_job_to_its_twin(worker_settings: Settings) -> None:
    settings = worker_settings.model_copy(update={"lease_s": 0.6, "heartbeat_s": 0.1})
    jobs = JobStore(connect(settings), settings.key_prefix)
    job_id = _job(settings, ["extract"])
    seen: list[Path] = []

    def steal_the_lease() -> None:  # what a redelivery does once the lease has expired
        while not seen:
            time.sleep(0.01)
        jobs.redis.set(jobs._lease(job_id), "twin", px=60_000)

    thief = threading.Thread(target=steal_the_lease, daemon=True)
    thief.start()
    assert run_step(job_id, "extract", _polls_should_stop(seen), settings) == ABANDONED
    thief.join(timeout=30)
    record = jobs.get(job_id)
    assert record.state == "running" and record.error is None and record.artifacts == []  # the twin's to finish
    assert jobs.redis.get(jobs._lease(job_id)) == "twin"  # the twin's lease is left alone
    assert not seen[0].exists() and seen[0].parent.name.startswith("extract-")  # per-holder work dir, removed


def test_the_job_time_limit_stops_a_running_step(worker_settings: Settings) -> None:
    settings = worker_settings.model_copy(update={"job_timeout_s": 0.3})
    job_id = _job(settings, ["extract"])
    assert run_step(job_id, "extract", _polls_should_stop([]), settings) == "failed"
    record = JobStore(connect(settings), settings.key_prefix).get(job_id)
    assert record.state == "failed" and record.error and record.error.type == "JobTimeLimit"
    assert record.artifacts == ["extract/partial.json"]  # what it wrote is kept


def test_each_step_queues_the_next_while_it_holds_the_lease(worker_settings: Settings) -> None:
    from workers.reaper import requeue_lost

    settings = worker_settings.model_copy(update={"lease_s": 0.5, "heartbeat_s": 0.1})
    jobs = JobStore(connect(settings), settings.key_prefix)
    job_id = _job(settings, ["extract", "reconstruct"])
    queued: list[tuple[list[str], str | None]] = []

    def enqueue_next(record: JobRecord) -> None:  # sees the step done and the lease still held
        queued.append((record.steps_done, jobs.redis.get(jobs._lease(job_id))))

    assert run_step(job_id, "extract", _writes("states.safetensors")[0], settings, enqueue_next=enqueue_next) == "done"
    assert len(queued) == 1 and queued[0][0] == ["extract"] and queued[0][1] is not None
    assert jobs.in_flight_without_lease() == []  # handed on: nothing for the reaper
    assert run_step(job_id, "reconstruct", _writes("intervention.json")[0], settings, enqueue_next=enqueue_next) == "done"
    assert len(queued) == 1 and jobs.get(job_id).state == "succeeded"  # the last step queues nothing

    # The broker refuses the next step (or the worker dies before queuing it): the lease is left to expire,
    # and the reaper requeues the job, which is never stranded `running` with nothing queued.
    job_id = _job(settings, ["extract", "reconstruct"])

    def refuse(_: JobRecord) -> None:
        raise ConnectionError("broker away")

    assert run_step(job_id, "extract", _writes("states.safetensors")[0], settings, enqueue_next=refuse) == "done"
    deadline = time.monotonic() + 30  # only ends a hung test
    while job_id not in jobs.in_flight_without_lease() and time.monotonic() < deadline:
        time.sleep(0.05)
    requeued: list[str] = []
    outcomes = requeue_lost(jobs, lambda r: requeued.append(r.id), lambda _: None, max_attempts=3)
    assert outcomes == {job_id: "requeued"} and requeued == [job_id]
    assert jobs.get(job_id).steps_done == ["extract"]  # the requeue runs what is left

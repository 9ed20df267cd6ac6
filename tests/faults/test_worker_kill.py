"""A worker is killed with SIGKILL in the middle of a job: the job's lease expires, the next worker's reaper
requeues the step and the job succeeds; a job whose worker keeps dying ends `failed` with the reason after
`max_attempts` runs. Never stuck `running`, nothing lost."""

from __future__ import annotations

from pathlib import Path

from tests.faults.conftest import Workers, fault_settings, until
from workers.job_service import JobService
from workers.jobs import JobRecord, JobStore
from workers.settings import Settings
from workers.specs import GenerateSpec, PromptSource


def _submit(settings: Settings) -> str:
    prompts = [f"The weather in city number {i} is" for i in range(48)]
    spec = GenerateSpec(prompts=PromptSource(texts=prompts), samples=2, max_new_tokens=16, batch_size=16)
    record, _ = JobService(settings).submit("generate", spec)
    return record.id


def _state(jobs: JobStore, job_id: str) -> JobRecord:
    return jobs.get(job_id)


def test_a_job_whose_worker_is_killed_is_redelivered_and_succeeds(redis_url: str, tmp_path: Path) -> None:
    settings = fault_settings(redis_url, tmp_path, max_attempts=3)
    workers = Workers(settings)
    try:
        first = workers.start()
        job_id = _submit(settings)
        until(lambda: _state(workers.jobs, job_id).state == "running", "the job to start")
        workers.kill(first)
        assert _state(workers.jobs, job_id).state == "running"  # as the dead worker left it
        workers.start()
        until(lambda: _state(workers.jobs, job_id).state in ("succeeded", "failed"), "the job to end")
        record = _state(workers.jobs, job_id)
        assert record.state == "succeeded", (record.error, workers.logs())
        assert record.worker_losses == 1 and record.steps_done == ["generate"]
        assert "generate/continuations.safetensors" in record.artifacts
        assert (settings.artifacts_dir / "jobs" / job_id / "generate" / "continuations.safetensors").is_file()
        assert workers.jobs.in_flight_without_lease() == []
    finally:
        workers.stop()


def test_a_job_that_keeps_losing_its_worker_fails_with_the_reason(redis_url: str, tmp_path: Path) -> None:
    settings = fault_settings(redis_url, tmp_path, max_attempts=2)
    workers = Workers(settings)
    try:
        process = workers.start()
        job_id = _submit(settings)
        for attempt in (1, 2):
            until(lambda: _state(workers.jobs, job_id).state == "running", f"run {attempt} to start")
            workers.kill(process)
            process = workers.start()  # its reaper finds the expired lease
        until(lambda: _state(workers.jobs, job_id).state not in ("running", "queued"), "the job to end")
        record = _state(workers.jobs, job_id)
        assert record.state == "failed" and record.worker_losses == 2, workers.logs()
        assert record.error is not None and record.error.type == "WorkerLost"
        assert "'generate'" in record.error.message and "max_attempts=2" in record.error.message
        assert workers.jobs.in_flight_without_lease() == []
    finally:
        workers.stop()

"""Celery tasks, one per step; names match the CLI subcommands. Each only hands its job to the runner."""

from __future__ import annotations

from celery import Task
from celery.exceptions import Ignore

from workers import steps, webhooks
from workers.celery_app import NOTIFY_TASK, app
from workers.jobs import JobNotFound, JobStore, connect
from workers.runner import ABANDONED, RUNNING_ELSEWHERE, StepFunction
from workers.runner import run_step as run_step_of_job
from workers.settings import get_settings


def run_step(job_id: str, step: str, function: StepFunction) -> str:
    """The runner's outcome; a job whose step another task is running stops this chain here (`Ignore`), so
    a duplicate delivery never starts the next step early."""
    outcome = run_step_of_job(job_id, step, function)
    if outcome in (RUNNING_ELSEWHERE, ABANDONED):
        raise Ignore()
    return outcome


@app.task(name="eigenshift.generate")
def generate(job_id: str) -> str:
    """Step 1 of job `job_id`: continuations and their states."""
    return run_step(job_id, "generate", steps.generate)


@app.task(name="eigenshift.extract")
def extract(job_id: str) -> str:
    """Step 2 of job `job_id` (with step 1 when it names prompts): toxic and non-toxic states."""
    return run_step(job_id, "extract", steps.extract)


@app.task(name="eigenshift.reconstruct")
def reconstruct(job_id: str) -> str:
    """Step 3 of job `job_id`: decompose, select, damp; registers the intervention."""
    return run_step(job_id, "reconstruct", steps.reconstruct)


@app.task(name="eigenshift.evaluate")
def evaluate(job_id: str) -> str:
    """Step 4 of job `job_id`: toxicity before and after on held-out prompts."""
    return run_step(job_id, "evaluate", steps.evaluate)


@app.task(name=NOTIFY_TASK, bind=True, max_retries=None)
def notify(self: Task, job_id: str, delivery_id: str) -> str:
    """POST finished job `job_id`'s signed record to its callback_url; retried with exponential backoff."""
    settings = get_settings()
    try:
        attempt = webhooks.deliver(settings, JobStore(connect(settings), settings.key_prefix), job_id, delivery_id,
                                   self.request.retries + 1)
    except JobNotFound:  # deleted since (retention): nothing left to send
        return "job gone"
    if attempt.retry:
        raise self.retry(countdown=webhooks.backoff_s(settings, attempt.delivery.attempt))
    return "delivered" if attempt.delivery.ok else "given up"

"""Celery tasks, one per step; names match the CLI subcommands. Each only hands its job to the runner."""

from __future__ import annotations

from celery import Task
from celery.exceptions import Ignore

from workers import steps, webhooks
from workers.celery_app import NOTIFY_TASK, app, enqueue_steps
from workers.jobs import JobNotFound, JobStore, connect
from workers.runner import ABANDONED, RUNNING_ELSEWHERE, StepFunction
from workers.runner import run_step as run_step_of_job
from workers.settings import get_settings

CLAIM_TRIES = 8  # a step whose job's lease is held waits this many quarter-leases before it gives up


def run_step(task: Task, job_id: str, step: str, function: StepFunction) -> str:
    """The runner's outcome. A step that finds the job's lease held waits (retries) up to two lease periods:
    the previous step may still be letting go of it, or its worker died holding it. Then, or when this
    task lost its own lease, it stops here (`Ignore`): a duplicate never runs a step twice at once."""
    settings = get_settings()
    outcome = run_step_of_job(job_id, step, function, settings,
                              enqueue_next=lambda record: enqueue_steps(app, record, settings.queue))
    if outcome == RUNNING_ELSEWHERE and task.request.retries < CLAIM_TRIES:
        raise task.retry(countdown=max(0.5, settings.lease_s / 4), max_retries=CLAIM_TRIES)
    if outcome in (RUNNING_ELSEWHERE, ABANDONED):
        raise Ignore()
    return outcome


@app.task(name="eigenshift.generate", bind=True)
def generate(self: Task, job_id: str) -> str:
    """Step 1 of job `job_id`: continuations and their states."""
    return run_step(self, job_id, "generate", steps.generate)


@app.task(name="eigenshift.extract", bind=True)
def extract(self: Task, job_id: str) -> str:
    """Step 2 of job `job_id` (with step 1 when it names prompts): toxic and non-toxic states."""
    return run_step(self, job_id, "extract", steps.extract)


@app.task(name="eigenshift.reconstruct", bind=True)
def reconstruct(self: Task, job_id: str) -> str:
    """Step 3 of job `job_id`: decompose, select, damp; registers the intervention."""
    return run_step(self, job_id, "reconstruct", steps.reconstruct)


@app.task(name="eigenshift.evaluate", bind=True)
def evaluate(self: Task, job_id: str) -> str:
    """Step 4 of job `job_id`: toxicity before and after on held-out prompts."""
    return run_step(self, job_id, "evaluate", steps.evaluate)


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

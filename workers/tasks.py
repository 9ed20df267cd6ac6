"""Celery tasks, one per step; names match the CLI subcommands. Each only hands its job to the runner."""

from __future__ import annotations

from workers import steps
from workers.celery_app import app
from workers.runner import run_step


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

"""Jobs: create one per step or the whole pipeline, follow, list, cancel, download artifacts.

A job belongs to the key that made it: other keys (but admins) get 404 for it and never see it listed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.deps import IdempotencyKeyDep, ReaderDep, ServiceDep, WriterDep
from app.api.errors import Problem
from app.schemas import (
    EvaluateJobCreate,
    ExtractJobCreate,
    GenerateJobCreate,
    JobPublic,
    JobsPublic,
    PipelineJobCreate,
    ReconstructJobCreate,
)
from workers.job_service import JobEnded
from workers.jobs import JobState
from workers.owners import Caller
from workers.specs import ID_PATTERN, JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="job id")]
ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"description": "queued; Location names the job"}}


async def _submit(service: ServiceDep, kind: str, spec: JobSpec, key: str | None, response: Response,
                  caller: Caller) -> JobPublic:
    record, _ = await run_in_threadpool(lambda: service.submit(kind, spec, key, caller=caller))
    response.headers["Location"] = f"/jobs/{record.id}"
    return JobPublic.from_record(record)


@router.post("/generate", status_code=202, responses=ACCEPTED)
async def create_generate_job(body: GenerateJobCreate, service: ServiceDep, response: Response, caller: WriterDep,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 1: continuations of the prompts and their states."""
    return await _submit(service, "generate", body, idempotency_key, response, caller)


@router.post("/extract", status_code=202, responses=ACCEPTED)
async def create_extract_job(body: ExtractJobCreate, service: ServiceDep, response: Response, caller: WriterDep,
                             idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 2: toxic and non-toxic states from a generate job, prompts or a reference CSV."""
    return await _submit(service, "extract", body, idempotency_key, response, caller)


@router.post("/reconstruct", status_code=202, responses=ACCEPTED)
async def create_reconstruct_job(body: ReconstructJobCreate, service: ServiceDep, response: Response, caller: WriterDep,
                                 idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 3 on an extract job's states, or steps 1–3 on a prompt source."""
    return await _submit(service, "reconstruct", body, idempotency_key, response, caller)


@router.post("/evaluate", status_code=202, responses=ACCEPTED)
async def create_evaluate_job(body: EvaluateJobCreate, service: ServiceDep, response: Response, caller: WriterDep,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 4: toxicity before and after an intervention on held-out prompts, or several side by side."""
    return await _submit(service, "evaluate", body, idempotency_key, response, caller)


@router.post("/pipeline", status_code=202, responses=ACCEPTED)
async def create_pipeline_job(body: PipelineJobCreate, service: ServiceDep, response: Response, caller: WriterDep,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue all four steps: build on train_rows, evaluate on eval_rows."""
    return await _submit(service, "pipeline", body, idempotency_key, response, caller)


@router.get("")
async def list_jobs(service: ServiceDep, caller: ReaderDep, kind: str | None = Query(None, pattern=r"^[a-z]{1,20}$"),
                    state: JobState | None = None, offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=500)) -> JobsPublic:
    """List your jobs (an admin: everyone's), newest first, filtered by kind and state."""
    records, total = await run_in_threadpool(lambda: service.list_jobs(caller, kind=kind, state=state, offset=offset,
                                                                       limit=limit))
    return JobsPublic(data=[JobPublic.from_record(r) for r in records], count=total, offset=offset, limit=limit)


@router.get("/{job_id}")
async def read_job(job_id: JobId, service: ServiceDep, caller: ReaderDep) -> JobPublic:
    """Read a job: state, progress, timestamps, error, artifacts and the intervention it made."""
    return JobPublic.from_record(await run_in_threadpool(service.get, job_id, caller))


@router.post("/{job_id}/cancel", status_code=202)
async def cancel_job(job_id: JobId, service: ServiceDep, caller: WriterDep) -> JobPublic:
    """Cancel a job: now when queued, at the next batch boundary when running; 409 when it has ended."""
    try:
        record = await run_in_threadpool(service.cancel, job_id, caller)
    except JobEnded as error:
        raise Problem(409, str(error), slug="job-ended") from None
    return JobPublic.from_record(record)


@router.get("/{job_id}/artifacts/{name:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def read_artifact(job_id: JobId, name: str, service: ServiceDep, caller: ReaderDep) -> StreamingResponse:
    """Download one artifact of a job."""
    try:
        chunks = await run_in_threadpool(service.artifact, job_id, name, caller)
        first = await run_in_threadpool(next, chunks, b"")
    except FileNotFoundError:
        raise Problem(404, f"job {job_id!r} has no artifact {name!r}", slug="artifact-not-found") from None

    def body():  # type: ignore[no-untyped-def]
        yield first
        yield from chunks

    media = "application/json" if name.endswith(".json") else "image/png" if name.endswith(".png") else \
        "application/octet-stream"
    return StreamingResponse(body(), media_type=media)

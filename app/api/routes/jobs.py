"""Jobs: create one per step or the whole pipeline, follow, list, cancel, download artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.auth import requires
from app.api.deps import IdempotencyKeyDep, ServiceDep
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
from workers.specs import ID_PATTERN, JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="job id")]
READ, WRITE = [requires("jobs:read")], [requires("jobs:write")]
ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"description": "queued; Location names the job"}}


async def _submit(service: ServiceDep, kind: str, spec: JobSpec, key: str | None, response: Response) -> JobPublic:
    record, _ = await run_in_threadpool(service.submit, kind, spec, key)
    response.headers["Location"] = f"/jobs/{record.id}"
    return JobPublic.from_record(record)


@router.post("/generate", status_code=202, responses=ACCEPTED, dependencies=WRITE)
async def create_generate_job(body: GenerateJobCreate, service: ServiceDep, response: Response,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 1: continuations of the prompts and their states."""
    return await _submit(service, "generate", body, idempotency_key, response)


@router.post("/extract", status_code=202, responses=ACCEPTED, dependencies=WRITE)
async def create_extract_job(body: ExtractJobCreate, service: ServiceDep, response: Response,
                             idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 2: toxic and non-toxic states from a generate job, prompts or a reference CSV."""
    return await _submit(service, "extract", body, idempotency_key, response)


@router.post("/reconstruct", status_code=202, responses=ACCEPTED, dependencies=WRITE)
async def create_reconstruct_job(body: ReconstructJobCreate, service: ServiceDep, response: Response,
                                 idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 3 on an extract job's states, or steps 1–3 on a prompt source."""
    return await _submit(service, "reconstruct", body, idempotency_key, response)


@router.post("/evaluate", status_code=202, responses=ACCEPTED, dependencies=WRITE)
async def create_evaluate_job(body: EvaluateJobCreate, service: ServiceDep, response: Response,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue step 4: toxicity before and after an intervention on held-out prompts."""
    return await _submit(service, "evaluate", body, idempotency_key, response)


@router.post("/pipeline", status_code=202, responses=ACCEPTED, dependencies=WRITE)
async def create_pipeline_job(body: PipelineJobCreate, service: ServiceDep, response: Response,
                              idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    """Queue all four steps: build on train_rows, evaluate on eval_rows."""
    return await _submit(service, "pipeline", body, idempotency_key, response)


@router.get("", dependencies=READ)
async def list_jobs(service: ServiceDep, kind: str | None = Query(None, pattern=r"^[a-z]{1,20}$"),
                    state: JobState | None = None, offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=500)) -> JobsPublic:
    """List jobs, newest first, filtered by kind and state."""
    records, total = await run_in_threadpool(service.jobs.list, kind=kind, state=state, offset=offset, limit=limit)
    return JobsPublic(data=[JobPublic.from_record(r) for r in records], count=total, offset=offset, limit=limit)


@router.get("/{job_id}", dependencies=READ)
async def read_job(job_id: JobId, service: ServiceDep) -> JobPublic:
    """Read a job: state, progress, timestamps, error, artifacts and the intervention it made."""
    return JobPublic.from_record(await run_in_threadpool(service.get, job_id))


@router.post("/{job_id}/cancel", status_code=202, dependencies=WRITE)
async def cancel_job(job_id: JobId, service: ServiceDep) -> JobPublic:
    """Cancel a job: now when queued, at the next batch boundary when running; 409 when it has ended."""
    try:
        record = await run_in_threadpool(service.cancel, job_id)
    except JobEnded as error:
        raise Problem(409, str(error), slug="job-ended") from None
    return JobPublic.from_record(record)


@router.get("/{job_id}/artifacts/{name:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}}, dependencies=READ)
async def read_artifact(job_id: JobId, name: str, service: ServiceDep) -> StreamingResponse:
    """Download one artifact of a job."""
    try:
        chunks = await run_in_threadpool(service.artifact, job_id, name)
        first = await run_in_threadpool(next, chunks, b"")
    except FileNotFoundError:
        raise Problem(404, f"job {job_id!r} has no artifact {name!r}", slug="artifact-not-found") from None

    def body():  # type: ignore[no-untyped-def]
        yield first
        yield from chunks

    media = "application/json" if name.endswith(".json") else "image/png" if name.endswith(".png") else \
        "application/octet-stream"
    return StreamingResponse(body(), media_type=media)

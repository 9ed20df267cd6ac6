"""Uploads of prompt files (CSV, JSONL, TXT), named later by `prompts.file_id` of the same key's jobs."""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import APIRouter, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.deps import ServiceDep, SettingsDep, WriterDep
from app.schemas import FilePublic
from eigenshift_core.errors import InputError
from eigenshift_core.prompts import SUFFIXES
from workers.jobs import TooLarge

router = APIRouter(prefix="/files", tags=["files"])


@router.post("", status_code=201)
async def create_file(file: UploadFile, service: ServiceDep, settings: SettingsDep, caller: WriterDep) -> FilePublic:
    """Upload a prompt file; its id goes into a job's `prompts.file_id`."""
    suffix = PurePosixPath(file.filename or "").suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"prompt files must end in one of {', '.join(SUFFIXES)}", field="file")
    data = await file.read(settings.max_body_bytes + 1)
    if len(data) > settings.max_body_bytes:
        raise TooLarge(f"file is over max_body_bytes={settings.max_body_bytes} bytes")
    file_id = await run_in_threadpool(service.uploads.put, data, suffix, caller)
    return FilePublic(id=file_id, bytes=len(data))

"""Interventions: list, read (model, k, α, metrics, provenance), activate as the model's default.

A job's intervention belongs to the job's key; everyone sees the built-in one and each model's active one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from app.api.auth import caller_with
from app.api.deps import ReaderDep, ServiceDep
from app.schemas import InterventionPublic, InterventionsPublic
from workers.interventions import InterventionRecord
from workers.owners import Caller
from workers.specs import ID_PATTERN

router = APIRouter(prefix="/interventions", tags=["interventions"])
InterventionId = Annotated[str, Path(pattern=ID_PATTERN, description="intervention id")]


def _public(record: InterventionRecord, active: str | None) -> InterventionPublic:
    return InterventionPublic(**record.model_dump(), active=record.id == active)


@router.get("")
async def list_interventions(service: ServiceDep, caller: ReaderDep,
                             model: str | None = Query(None, min_length=1, max_length=200)) -> InterventionsPublic:
    """List the interventions you may use (an admin: all), oldest first, optionally of one model."""
    def read() -> list[InterventionPublic]:
        records = service.interventions.list(caller, model)
        active = {r.model: service.interventions.active_id(r.model) for r in records}
        return [_public(r, active[r.model]) for r in records]

    data = await run_in_threadpool(read)
    return InterventionsPublic(data=data, count=len(data))


@router.get("/{intervention_id}")
async def read_intervention(intervention_id: InterventionId, service: ServiceDep, caller: ReaderDep) -> InterventionPublic:
    """Read one intervention."""
    def read() -> InterventionPublic:
        record = service.interventions.get(intervention_id, caller)
        return _public(record, service.interventions.active_id(record.model))

    return await run_in_threadpool(read)


@router.post("/{intervention_id}/activate")
async def activate_intervention(intervention_id: InterventionId, service: ServiceDep,
                                caller: Annotated[Caller, caller_with("admin")]) -> InterventionPublic:
    """Make this intervention its model's default for detoxified generation (everyone may then use it)."""
    record = await run_in_threadpool(service.interventions.activate, intervention_id, caller)
    return _public(record, record.id)

"""Interventions: list, read (model, k, α, metrics, provenance), activate as the model's default."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from app.api.auth import requires
from app.api.deps import ServiceDep
from app.schemas import InterventionPublic, InterventionsPublic
from workers.interventions import InterventionRecord
from workers.specs import ID_PATTERN

router = APIRouter(prefix="/interventions", tags=["interventions"])
InterventionId = Annotated[str, Path(pattern=ID_PATTERN, description="intervention id")]


def _public(record: InterventionRecord, active: str | None) -> InterventionPublic:
    return InterventionPublic(**record.model_dump(), active=record.id == active)


@router.get("", dependencies=[requires("jobs:read")])
async def list_interventions(service: ServiceDep,
                             model: str | None = Query(None, min_length=1, max_length=200)) -> InterventionsPublic:
    """List interventions, oldest first, optionally of one model."""
    def read() -> list[InterventionPublic]:
        records = service.interventions.list(model)
        active = {r.model: service.interventions.active_id(r.model) for r in records}
        return [_public(r, active[r.model]) for r in records]

    data = await run_in_threadpool(read)
    return InterventionsPublic(data=data, count=len(data))


@router.get("/{intervention_id}", dependencies=[requires("jobs:read")])
async def read_intervention(intervention_id: InterventionId, service: ServiceDep) -> InterventionPublic:
    """Read one intervention."""
    def read() -> InterventionPublic:
        record = service.interventions.get(intervention_id)
        return _public(record, service.interventions.active_id(record.model))

    return await run_in_threadpool(read)


@router.post("/{intervention_id}/activate", dependencies=[requires("admin")])
async def activate_intervention(intervention_id: InterventionId, service: ServiceDep) -> InterventionPublic:
    """Make this intervention its model's default for detoxified generation."""
    record = await run_in_threadpool(service.interventions.activate, intervention_id)
    return _public(record, record.id)

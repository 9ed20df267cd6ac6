"""Dependencies as `Annotated` aliases: the settings, the job service, the model server, the metrics, and the
caller (checked for its scope) whose name owns jobs, uploads and interventions."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.auth import caller_with
from app.api.errors import Problem
from app.metrics import Metrics
from app.serving import ModelServer
from workers.job_service import JobService
from workers.owners import Caller
from workers.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_service(request: Request) -> JobService:
    return request.app.state.service  # type: ignore[no-any-return]


def get_server(request: Request) -> ModelServer:
    server = getattr(request.app.state, "server", None)
    if server is None:
        raise Problem(503, "the model is not loaded yet", slug="model-loading")
    return server  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[JobService, Depends(get_service)]
ServerDep = Annotated[ModelServer, Depends(get_server)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
IdempotencyKeyDep = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=255, description="a retried POST returns the same job")
]
ReaderDep = Annotated[Caller, caller_with("jobs:read")]
WriterDep = Annotated[Caller, caller_with("jobs:write")]
GeneratorDep = Annotated[Caller, caller_with("generate")]

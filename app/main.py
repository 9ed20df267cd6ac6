"""`create_app()`: the FastAPI application, its routers, error handlers and the model it serves."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.api import errors
from app.api.auth import KeyRing, has_valid_key
from app.api.routes import files, generate, health, interventions, jobs, moderation, openai_compat, score
from app.bodies import BodyGuard
from app.metrics import Metrics
from app.serving import GenerationOutput, ModelServer
from app.ui import mount_ui
from eigenshift_core import __version__
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import DEFAULT_CACHE_DIR, load_model
from workers.job_service import JobService
from workers.models import grant_model
from workers.owners import SYSTEM
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)
DESCRIPTION = "EigenShift: a less toxic language model on demand, by damping a few directions of its output layer."


def _load_server(app: FastAPI, settings: Settings, service: JobService, metrics: Metrics) -> ModelServer:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    grant = grant_model(settings, settings.model)
    lm = load_model(grant.model_id, device=settings.device, dtype=settings.dtype, revision=grant.revision,
                    trust_remote_code=grant.trust_remote_code, cache_dir=settings.cache_dir or DEFAULT_CACHE_DIR)
    cache = settings.data_dir / "cache" / "interventions"

    def resolve(intervention_id: str) -> Intervention:
        record = service.interventions.get(intervention_id, SYSTEM)  # the route checked the caller
        if record.model != settings.model:
            from eigenshift_core.errors import InputError

            raise InputError(f"intervention {intervention_id!r} is for model {record.model!r}, "
                             f"this server serves {settings.model!r}", field="intervention")
        return Intervention.load(service.interventions.fetch(intervention_id, cache))

    def on_batch(outputs: list[GenerationOutput]) -> None:
        metrics.batch_rows.observe(len(outputs))

    return ModelServer(lm, resolve, max_size=settings.batch_max_size, window_s=settings.batch_window_ms / 1000,
                       on_batch=on_batch, max_waiting=settings.max_generate_queue,
                       prefill_tokens=settings.prefill_tokens_per_step, key_share=settings.batch_key_share,
                       prompt_cache_bytes=settings.prompt_cache_mb * 2**20)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    service = JobService(settings)
    app.state.service = service
    app.state.keys = await run_in_threadpool(KeyRing.from_settings, settings)
    try:
        await run_in_threadpool(service.interventions.register_builtin, settings.default_intervention, settings.model)
    except Exception:  # Redis not up yet: the API still starts and /readyz says why
        log.warning("could not register the default intervention", exc_info=True)
    server = await run_in_threadpool(_load_server, app, settings, service, app.state.metrics)
    await server.batcher.start()
    app.state.server = server
    # What start-up built (the model's modules, the libraries: ~470k objects on `embedded`) lives as long as
    # the app, yet every full collection would scan it: ~330 ms on a CPU with the GIL held, the model thread
    # and every request stalled. Frozen, collections scan only what requests allocate.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # this app's objects may go once it stops (tests start many apps in one process)
        await server.batcher.stop()


class QuerylessAccessLog(logging.Filter):
    """uvicorn's access lines without their query strings: `GET /generate?prompt=…` would log the prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn logs (client address, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].partition("?")[0] + "?[query masked]", *args[3:])
        return True


def mask_access_log_queries() -> None:
    """Install `QuerylessAccessLog` on uvicorn's access logger, once (uvicorn's logging config keeps it)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuerylessAccessLog) for f in access.filters):
        access.addFilter(QuerylessAccessLog())


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (default: from EIGENSHIFT_* variables)."""
    settings = settings or get_settings()
    app = FastAPI(title="EigenShift", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    errors.install(app, retry_after_s=settings.retry_after_s)
    mask_access_log_queries()
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, authenticated=has_valid_key)
    app.middleware("http")(metrics.middleware)  # added last: outermost, so it counts the refusals too
    for router in (jobs.router, interventions.router, generate.router, score.router, moderation.router,
                   openai_compat.router, files.router, health.router):
        app.include_router(router, responses=errors.PROBLEM_RESPONSES)
    mount_ui(app)
    return app

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.api.auth import requires
from app.api.deps import MetricsDep, ServiceDep, SettingsDep
from app.api.errors import problem
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def read_health() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"description": "not ready; `checks` says what is missing"}})
async def read_readiness(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """Readiness: Redis reachable, a worker alive, the model loaded."""
    def probe() -> dict[str, bool]:
        checks = {"redis": False, "worker": False, "model": getattr(request.app.state, "server", None) is not None}
        try:
            checks["redis"] = bool(service.redis.ping())
            checks["worker"] = bool(service.jobs.live_workers())
        except Exception:  # any Redis trouble means "not ready", never an error page
            pass
        return checks

    checks = await run_in_threadpool(probe)
    if all(checks.values()):
        return Response(Health(status="ready", checks=checks).model_dump_json(), media_type="application/json")
    missing = ", ".join(name for name, ok in checks.items() if not ok)
    return problem(503, f"not ready: {missing}", slug="not-ready", headers={"Retry-After": str(settings.retry_after_s)},
                   extra={"checks": checks})


@router.get("/metrics", dependencies=[requires("admin")], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def read_metrics(service: ServiceDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency, jobs by state, queue depth, tokens generated."""
    def gather() -> tuple[dict[str, int] | None, int | None]:
        try:
            return service.jobs.count_by_state(), service.queue_depth()
        except Exception:  # Redis away: still serve the process's own metrics
            return None, None

    jobs, depth = await run_in_threadpool(gather)
    return Response(metrics.render(jobs, depth), media_type="text/plain; version=0.0.4")

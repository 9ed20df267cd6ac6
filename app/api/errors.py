"""Every error as RFC 9457 problem+json (type, title, status, detail, and `field` when one is to blame), but
on the OpenAI-compatible routes (/v1/...), where it is OpenAI's envelope,
`{"error": {"message", "type", "param", "code"}}`, the one the openai SDKs read their exceptions from.

No handler ever returns a traceback; unexpected errors are logged and answered 500.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serving import Busy
from eigenshift_core.errors import InputError
from workers.interventions import InterventionNotFound
from workers.jobs import IdempotencyConflict, JobNotFound, TooLarge, Unavailable

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 405: "Method not allowed", 409: "Conflict",
          413: "Content too large", 422: "Invalid field", 429: "Too many requests", 500: "Internal error", 503: "Service unavailable",
          504: "Timed out"}


class FieldError(BaseModel):
    field: str
    message: str


class ProblemDetail(BaseModel):
    """The body of every error answer (application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="the request field to blame, when one is")
    errors: list[FieldError] | None = Field(None, description="every invalid field (422)")


_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}}
# Documented on every operation, so clients and schema checkers know the shape of any 4xx/5xx answer.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ProblemDetail, "description": "the request is refused: problem+json naming the field or limit",
            "content": _PROBLEM_CONTENT},
    "5XX": {"model": ProblemDetail, "description": "unavailable (with Retry-After) or internal error: problem+json",
            "content": _PROBLEM_CONTENT},
}


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "rate_limit_error or server_error")
    param: str | None = Field(None, description="the request field to blame, when one is")
    code: str | None = Field(None, description="what went wrong, e.g. model_not_found")


class OpenAIError(BaseModel):
    """The body of every error answer on the OpenAI-compatible routes (OpenAI's shape)."""

    error: OpenAIErrorBody


# The OpenAI-compatible routes, where errors take OpenAI's envelope: /v1alpha1/... (Perspective's) is not one.
OPENAI_PREFIX = "/v1/"
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OpenAIError, "description": "the request is refused: OpenAI's error envelope, `param` "
                                                 "naming the field"},
    "5XX": {"model": OpenAIError, "description": "unavailable (with Retry-After) or internal error: OpenAI's "
                                                 "error envelope"},
}
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_type(status: int) -> str:
    """OpenAI's `type` for an error status."""
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class Problem(Exception):
    """An error answered with its own status (routes raise it for 404s of path ids and the like)."""

    def __init__(self, status: int, detail: str, *, field: str | None = None, slug: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.slug, self.headers = status, detail, field, slug, headers


class ProblemResponse(JSONResponse):
    """problem+json, ASCII-escaped: a detail that quotes the request (a lone surrogate included) always encodes."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def problem(status: int, detail: str, *, field: str | None = None, slug: str | None = None,
            headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    title = TITLES.get(status, "Error")
    body: dict[str, Any] = {"type": f"urn:eigenshift:problem:{slug or title.lower().replace(' ', '-')}",
                            "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    body.update(extra or {})
    return ProblemResponse(body, status_code=status, headers=headers)


def openai_error(status: int, detail: str, *, field: str | None = None, slug: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error envelope; `code` is the problem's slug in OpenAI's spelling (model_not_found)."""
    code = (slug or TITLES.get(status, "error").lower().replace(" ", "-")).replace("-", "_")
    body = {"error": {"message": detail, "type": openai_type(status), "param": field, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(request: Request, status: int, detail: str, *, field: str | None = None, slug: str | None = None,
                   headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    """The error answer to `request`: OpenAI's envelope on the OpenAI routes, else problem+json."""
    if request.url.path.startswith(OPENAI_PREFIX):
        return openai_error(status, detail, field=field, slug=slug, headers=headers)
    return problem(status, detail, field=field, slug=slug, headers=headers, extra=extra)


TYPE_TAG = re.compile(r"^(float|int|str|bool|list|dict|none)$|[\[\]-]")  # union branches pydantic names in `loc`
MAX_ERRORS = 20  # field errors listed in one answer: a body of 50,000 bad items must not come back 50,000 times
MAX_PART_CHARS = 64  # of one `loc` part: a dict key is the client's text


def _field(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(shorten(p) for p in parts if not TYPE_TAG.search(p)) or "body"


def shorten(text: str, limit: int = MAX_PART_CHARS) -> str:
    """`text`, cut to `limit` characters (with an ellipsis) when longer: what an error may quote of a request."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def install(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the handlers on `app`."""
    unavailable_headers = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in error.errors()[:MAX_ERRORS]]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return error_response(request, 422, f"{first['field']}: {first['message']}", field=first["field"],
                              extra={"errors": errors})

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return error_response(request, 422, str(error), field=error.field)

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, error: TooLarge) -> JSONResponse:
        return error_response(request, 413, str(error))

    @app.exception_handler(Problem)
    async def own(request: Request, error: Problem) -> JSONResponse:
        return error_response(request, error.status, error.detail, field=error.field, slug=error.slug, headers=error.headers)

    @app.exception_handler(JobNotFound)
    async def no_job(request: Request, error: JobNotFound) -> JSONResponse:
        return error_response(request, 404, f"no job {error.args[0]!r}", slug="job-not-found")

    @app.exception_handler(InterventionNotFound)
    async def no_intervention(request: Request, error: InterventionNotFound) -> JSONResponse:
        return error_response(request, 404, f"no intervention {error.args[0]!r}", slug="intervention-not-found")

    @app.exception_handler(IdempotencyConflict)
    async def conflict(request: Request, error: IdempotencyConflict) -> JSONResponse:
        return error_response(request, 409, str(error), field="Idempotency-Key", slug="idempotency-conflict")

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        return error_response(request, 503, str(error), slug="generation-queue-full", headers=unavailable_headers)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, error: Unavailable) -> JSONResponse:
        return error_response(request, 503, str(error), headers=unavailable_headers)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, error: redis.RedisError) -> JSONResponse:
        log.warning("redis error: %s", error)
        return error_response(request, 503, "the job store (Redis) is unreachable", slug="redis-unavailable", headers=unavailable_headers)

    @app.exception_handler(OperationalError)
    async def broker_down(request: Request, error: OperationalError) -> JSONResponse:
        return error_response(request, 503, "the job queue is unreachable", slug="broker-unavailable", headers=unavailable_headers)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request, error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal error; the server log has the details")

"""A Python client for an EigenShift service: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

Standalone: it talks HTTP only and imports nothing of the service, so it installs without torch.

    client = Client("http://127.0.0.1:8000")          # the key from EIGENSHIFT_API_KEY
    job = client.wait(client.submit_reconstruct(reference_csv="words.csv", rows="0:200", k=16))
    client.generate("You are such a", detox=True)

Results are frozen dataclasses parsed leniently (unknown fields are ignored, so newer servers work);
every error response raises an `EigenShiftError` subclass carrying the problem+json details.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.metadata
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from tqdm.auto import tqdm

from eigenshift.signing import sign, verify_signature

__all__ = [
    "AsyncClient", "Client", "Job", "JobProgress", "JobFailure", "Artifact", "Generation", "Intervention",
    "Moderation", "ModerationResult", "ModerationSpan", "Health", "FieldError",
    "EigenShiftError", "APIConnectionError", "WaitTimeout", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "ValidationError",
    "RateLimitError", "ServerError", "ServiceUnavailableError", "sign", "verify_signature",
]

try:  # the installed distribution's version: the one string lives in eigenshift_core/__init__.py
    VERSION = importlib.metadata.version("eigenshift")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "unknown"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 503)
JSON = dict[str, Any]


# -- errors ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a 422 answer: its dotted name and what is wrong with it."""

    field: str
    message: str


class EigenShiftError(Exception):
    """Any error from the service (or from reaching it). `status` is None when no answer came."""

    def __init__(self, message: str, *, status: int | None = None, title: str | None = None,
                 detail: str | None = None, type: str | None = None, field: str | None = None,
                 errors: Sequence[FieldError] = (), retry_after: float | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.title, self.detail, self.type = status, title, detail, type
        self.field, self.errors, self.retry_after = field, tuple(errors), retry_after
        self.body: Mapping[str, Any] = body or {}


class APIConnectionError(EigenShiftError):
    """The service could not be reached, or did not answer in time."""


class WaitTimeout(EigenShiftError):
    """`wait` gave up before the job ended; `job` is the last state seen."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class BadRequestError(EigenShiftError):
    """400."""


class AuthenticationError(EigenShiftError):
    """401: no key, or an unknown one."""


class PermissionDeniedError(EigenShiftError):
    """403: the key lacks the scope."""


class NotFoundError(EigenShiftError):
    """404."""


class ConflictError(EigenShiftError):
    """409: an Idempotency-Key reused with another body."""


class PayloadTooLargeError(EigenShiftError):
    """413: over a configured limit."""


class ValidationError(EigenShiftError):
    """422: `field` names the invalid field; `errors` lists each one."""


class RateLimitError(EigenShiftError):
    """429: `retry_after` says when to try again."""


class ServerError(EigenShiftError):
    """5xx."""


class ServiceUnavailableError(ServerError):
    """503: Redis, the worker or the model is not ready; `retry_after` says when to try again."""


ERRORS: dict[int, type[EigenShiftError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(status: int, headers: httpx.Headers, content: bytes) -> EigenShiftError:
    """The typed error for an error answer, with the problem+json fields when the body has them (or OpenAI's
    error envelope, mapped onto them)."""
    try:
        body = httpx.Response(status, headers=headers, content=content).json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": content[:500].decode("utf-8", "replace") or None}
    envelope = body.get("error")
    if isinstance(envelope, dict):  # OpenAI's shape, on the /v1/... routes
        body = {**body, "type": envelope.get("type"), "detail": envelope.get("message"),
                "field": envelope.get("param")}
    errors = [FieldError(str(e.get("field", "")), str(e.get("message", ""))) for e in body.get("errors") or []
              if isinstance(e, dict)]
    detail, title = body.get("detail"), body.get("title")
    kind = ERRORS.get(status, ServerError if status >= 500 else EigenShiftError)
    return kind(f"{status} {title or 'Error'}: {detail}" if detail else f"{status} {title or 'Error'}",
                status=status, title=title, detail=detail, type=body.get("type"), field=body.get("field"),
                errors=errors, retry_after=retry_after_s(headers.get("retry-after")), body=body)


# -- results -----------------------------------------------------------------------------------------------


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class JobProgress:
    """Where a running job is: its stage and `done` of `total` `unit`s (0 of 0 when unknown)."""

    stage: str | None = None
    done: int = 0
    total: int = 0
    unit: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> JobProgress:
        data = data or {}
        return cls(data.get("stage"), int(data.get("done") or 0), int(data.get("total") or 0), data.get("unit"))


@dataclass(frozen=True)
class JobFailure:
    """Why a job failed: the error's type and message."""

    type: str
    message: str


@dataclass(frozen=True)
class Artifact:
    """A file a job wrote, e.g. `reconstruct/intervention.safetensors`; `href` is its download path."""

    name: str
    href: str


@dataclass(frozen=True)
class Job:
    """A job as the service reports it (also the body of a job webhook)."""

    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress = JobProgress()
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobFailure | None = None
    cancel_requested: bool = False
    steps: tuple[str, ...] = ()
    steps_done: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    intervention_id: str | None = None
    artifacts: tuple[Artifact, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def artifact_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.artifacts)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        error = data.get("error")
        # The API lists artifacts as {name, href}; a webhook's job record lists bare names.
        artifacts = tuple(Artifact(a["name"], a.get("href", "")) if isinstance(a, dict)
                          else Artifact(str(a), f"/jobs/{data['id']}/artifacts/{a}") for a in data.get("artifacts") or [])
        return cls(
            id=data["id"], kind=data.get("kind", ""), state=data["state"],
            progress=JobProgress.from_json(data.get("progress")), created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")), finished_at=_time(data.get("finished_at")),
            error=JobFailure(str(error.get("type", "")), str(error.get("message", ""))) if isinstance(error, dict) else None,
            cancel_requested=bool(data.get("cancel_requested")), steps=tuple(data.get("steps") or ()),
            steps_done=tuple(data.get("steps_done") or ()), params=dict(data.get("params") or {}),
            intervention_id=data.get("intervention_id"), artifacts=artifacts,
        )


@dataclass(frozen=True)
class Generation:
    """One continuation: its text and tokens, whether the intervention was applied, and the seed used."""

    prompt: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    detox: bool
    intervention: str | None
    seed: int | None
    toxicity: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        return cls(
            prompt=data.get("prompt", ""), text=data.get("text", ""), token_ids=tuple(data.get("token_ids") or ()),
            logprobs=tuple(data.get("logprobs") or ()), finish_reason=data.get("finish_reason", ""),
            detox=bool(data.get("detox")), intervention=data.get("intervention"), seed=data.get("seed"),
            toxicity=_float(data.get("toxicity")),
        )


@dataclass(frozen=True)
class ModerationSpan:
    """A toxic stretch of the input: characters [begin, end) and their score."""

    begin: int
    end: int
    score: float
    text: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModerationSpan:
        return cls(int(data.get("begin", 0)), int(data.get("end", 0)), float(data.get("score") or 0.0),
                   str(data.get("text", "")))


@dataclass(frozen=True)
class ModerationResult:
    """The verdict on one input, OpenAI-shaped, plus EigenShift's toxicity, labels and spans."""

    flagged: bool
    categories: Mapping[str, bool]
    category_scores: Mapping[str, float]
    toxicity: float | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    spans: tuple[ModerationSpan, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModerationResult:
        own = data.get("eigenshift") or {}
        return cls(
            flagged=bool(data.get("flagged")), categories=dict(data.get("categories") or {}),
            category_scores=dict(data.get("category_scores") or {}), toxicity=_float(own.get("toxicity")),
            labels=dict(own.get("labels") or {}), spans=tuple(ModerationSpan.from_json(s) for s in own.get("spans") or []),
        )


@dataclass(frozen=True)
class Moderation:
    """The answer of POST /v1/moderations: one result per input, in order."""

    id: str
    model: str
    results: tuple[ModerationResult, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Moderation:
        return cls(str(data.get("id", "")), str(data.get("model", "")),
                   tuple(ModerationResult.from_json(r) for r in data.get("results") or []))


@dataclass(frozen=True)
class Intervention:
    """A built intervention: which model, how many directions, their α, its metrics and provenance."""

    id: str
    model: str
    k: int
    alpha: tuple[float, ...]
    active: bool = False
    criterion: str | None = None
    metrics: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    created_at: datetime | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Intervention:
        return cls(
            id=data["id"], model=data.get("model", ""), k=int(data.get("k") or 0), alpha=tuple(data.get("alpha") or ()),
            active=bool(data.get("active")), criterion=data.get("criterion"), metrics=data.get("metrics"),
            provenance=dict(data.get("provenance") or {}), job_id=data.get("job_id"),
            created_at=_time(data.get("created_at")),
        )


@dataclass(frozen=True)
class Health:
    status: str
    checks: Mapping[str, bool] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Health:
        return cls(str(data.get("status", "")), dict(data.get("checks") or {}))


# -- request bodies (pure, shared by both clients) ---------------------------------------------------------


def _present(values: Mapping[str, Any]) -> JSON:
    """The given values only: anything left None takes the server's default."""
    return {name: value for name, value in values.items() if value is not None}


def prompt_source(prompts: Sequence[str] | Mapping[str, Any] | None) -> JSON | None:
    """A PromptSource body: a list of texts becomes {"texts": [...]}; a dict is sent as it is."""
    if prompts is None or isinstance(prompts, Mapping):
        return dict(prompts) if prompts is not None else None
    if isinstance(prompts, str):
        return {"texts": [prompts]}
    return {"texts": list(prompts)}


def generate_body(prompt: str | Sequence[str], *, detox: bool, intervention: str | None, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int | None, score: bool) -> JSON:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    item = _present({"detox": detox, "intervention": intervention, "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "top_p": top_p, "seed": seed})
    return {"items": [{"prompt": p, **item} for p in prompts], "score": score}


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def _artifact_path(job: Job | str, name: str) -> str:
    return f"/jobs/{_job_id(job)}/artifacts/{name.lstrip('/')}"


def _destination(dest: str | os.PathLike[str], name: str) -> Path:
    """Where `download` writes: a directory (one that exists, or any path ending in a slash, made here) takes
    the artifact's base name; any other path is the file itself."""
    text = os.fspath(dest)
    path = Path(text)
    if path.is_dir() or text.endswith((os.sep, "/")):
        path.mkdir(parents=True, exist_ok=True)
        return path / Path(name).name
    return path


class _Progress:
    """A tqdm bar that follows a job's {stage, done, total, unit}: one bar per stage, so its total, rate and
    ETA are the stage's own."""

    def __init__(self, job: Job, enabled: bool) -> None:
        self.bar = tqdm(total=None, desc=f"job {job.id[:8]}", unit="it", disable=not enabled, leave=True)
        self.stage: tuple[str | None, int] = (None, 0)

    def show(self, job: Job) -> None:
        p = job.progress
        if (p.stage, p.total) != self.stage:  # a new stage: start its bar from where it is
            self.stage = (p.stage, p.total)
            self.bar.reset(total=p.total or None)
            self.bar.unit = p.unit or "it"
            self.bar.set_description(f"job {job.id[:8]} {p.stage or job.state}", refresh=False)
        if p.done > self.bar.n:
            self.bar.update(p.done - self.bar.n)  # update(), not n=: tqdm's rate and ETA come from updates
        self.bar.set_postfix_str(job.state, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# -- the clients -------------------------------------------------------------------------------------------


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, max_retries: int,
                 max_retry_wait_s: float) -> None:
        self.base_url = (base_url or os.environ.get("EIGENSHIFT_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("EIGENSHIFT_API_KEY")
        self.timeout, self.max_retries, self.max_retry_wait_s = timeout, max_retries, max_retry_wait_s

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"eigenshift-python/{VERSION}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _retry_wait(self, error: EigenShiftError, attempt: int) -> float | None:
        """Seconds to wait before retrying a 429/503, or None to give up (retries spent, or a long wait asked)."""
        if error.status not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        wait = error.retry_after if error.retry_after is not None else min(2.0 ** attempt, self.max_retry_wait_s)
        return wait if wait <= self.max_retry_wait_s else None


class Client(_Base):
    """A blocking client. Use as a context manager, or call `close()`.

    `max_retries` retries of a 429 or 503 (the service answers those before doing any work, so a retried
    POST never runs twice), each after the answer's Retry-After when it is at most `max_retry_wait_s`.
    `transport` or `http_client` replace the HTTP layer (tests, proxies, custom TLS).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, max_retry_wait_s: float = 30.0, transport: httpx.BaseTransport | None = None,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait_s)
        self._owns_http = http_client is None
        self.http = http_client or httpx.Client(transport=transport, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def _send(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self.http.request(method, self.base_url + path, json=json, params=params,
                                             headers={**self._headers(), **(headers or {})}, timeout=self.timeout)
            except httpx.TransportError as error:
                raise APIConnectionError(f"{method} {path}: {type(error).__name__}: {error}") from error
            if response.is_success:
                return response
            problem = error_from_response(response.status_code, response.headers, response.content)
            wait = self._retry_wait(problem, attempt)
            if wait is None:
                raise problem
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # jobs

    def submit(self, kind: str, *, idempotency_key: str | None = None, **spec: Any) -> Job:
        """Queue a job of `kind` (generate, extract, reconstruct, evaluate, pipeline) with the spec's fields;
        a retried call with the same `idempotency_key` returns the first job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        if "prompts" in spec:
            spec["prompts"] = prompt_source(spec["prompts"])
        return Job.from_json(self._json("POST", f"/jobs/{kind}", json=_present(spec), headers=headers))

    def submit_reconstruct(
        self, *, extract_job_id: str | None = None, prompts: Sequence[str] | Mapping[str, Any] | None = None,
        reference_csv: str | None = None, rows: str | None = None, criterion: str | None = None,
        k: int | None = None, percentile: float | None = None, alpha: float | Sequence[float] | str | None = None,
        model: str | None = None, seed: int | None = None, samples: int | None = None,
        max_new_tokens: int | None = None, top_p: float | None = None, temperature: float | None = None,
        batch_size: int | None = None, scorer: str | None = None, threshold: float | None = None,
        top_words: int | None = None, max_nontoxic: int | None = None, callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue step 3 on an extract job's states (`extract_job_id`), or steps 1–3 on a prompt source
        (`prompts`: texts or a PromptSource dict, and/or `reference_csv`). Unset fields take the server's defaults."""
        return self.submit("reconstruct", idempotency_key=idempotency_key, **_reconstruct_spec(locals()))

    def job(self, job: Job | str) -> Job:
        """The job's current state."""
        return Job.from_json(self._json("GET", f"/jobs/{_job_id(job)}"))

    def cancel(self, job: Job | str) -> Job:
        """Ask the job to stop (now when queued, at its next batch boundary when running)."""
        return Job.from_json(self._json("POST", f"/jobs/{_job_id(job)}/cancel"))

    def wait(self, job: Job | str, *, poll_s: float = 1.0, timeout_s: float | None = None,
             progress: bool = True) -> Job:
        """Poll until the job succeeded, failed or was cancelled, with a progress bar; returns it in that state.
        Raises `WaitTimeout` (holding the last state seen) after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        current = self.job(job)
        bar = _Progress(current, progress)
        try:
            while True:
                bar.show(current)
                if current.finished:
                    return current
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"job {current.id} still {current.state} after {timeout_s:g} s", current)
                time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
                current = self.job(current)
        finally:
            bar.close()

    def download(self, job: Job | str, name: str, dest: str | os.PathLike[str] | None = None) -> bytes | Path:
        """An artifact's bytes, or, given `dest` (a file, or a directory to put it in), the path written.
        The body is streamed, so a large file never sits in memory when `dest` is given."""
        path = _artifact_path(job, name)
        with self.http.stream("GET", self.base_url + path, headers=self._headers(), timeout=self.timeout) as response:
            if not response.is_success:
                raise error_from_response(response.status_code, response.headers, response.read())
            if dest is None:
                return response.read()
            target = _destination(dest, name)
            partial = target.with_name(target.name + ".part")
            with partial.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
            partial.replace(target)
            return target

    # serving

    def generate(self, prompt: str | Sequence[str], *, detox: bool = True, intervention: str | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 score: bool = False) -> list[Generation]:
        """Continue one prompt or several (one batch), detoxified or not; `score` adds each output's toxicity."""
        body = generate_body(prompt, detox=detox, intervention=intervention, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, score=score)
        return [Generation.from_json(g) for g in self._json("POST", "/generate", json=body)["data"]]

    def moderate(self, input: str | Sequence[str], model: str | None = None) -> Moderation:
        """Toxicity verdicts, OpenAI moderation-shaped (POST /v1/moderations), one result per input."""
        body = _present({"input": input if isinstance(input, str) else list(input), "model": model})
        return Moderation.from_json(self._json("POST", "/v1/moderations", json=body))

    def interventions(self, model: str | None = None) -> list[Intervention]:
        """The interventions the service holds, oldest first."""
        data = self._json("GET", "/interventions", params=_present({"model": model}))["data"]
        return [Intervention.from_json(i) for i in data]

    def health(self) -> Health:
        """Liveness (GET /healthz, needs no key)."""
        return Health.from_json(self._json("GET", "/healthz"))


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited. Use `async with`, or `await close()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, max_retry_wait_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait_s)
        self._owns_http = http_client is None
        self.http = http_client or httpx.AsyncClient(transport=transport, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def _send(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                    headers: Mapping[str, str] | None = None) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self.http.request(method, self.base_url + path, json=json, params=params,
                                                   headers={**self._headers(), **(headers or {})}, timeout=self.timeout)
            except httpx.TransportError as error:
                raise APIConnectionError(f"{method} {path}: {type(error).__name__}: {error}") from error
            if response.is_success:
                return response
            problem = error_from_response(response.status_code, response.headers, response.content)
            wait = self._retry_wait(problem, attempt)
            if wait is None:
                raise problem
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def submit(self, kind: str, *, idempotency_key: str | None = None, **spec: Any) -> Job:
        """See `Client.submit`."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        if "prompts" in spec:
            spec["prompts"] = prompt_source(spec["prompts"])
        return Job.from_json(await self._json("POST", f"/jobs/{kind}", json=_present(spec), headers=headers))

    async def submit_reconstruct(
        self, *, extract_job_id: str | None = None, prompts: Sequence[str] | Mapping[str, Any] | None = None,
        reference_csv: str | None = None, rows: str | None = None, criterion: str | None = None,
        k: int | None = None, percentile: float | None = None, alpha: float | Sequence[float] | str | None = None,
        model: str | None = None, seed: int | None = None, samples: int | None = None,
        max_new_tokens: int | None = None, top_p: float | None = None, temperature: float | None = None,
        batch_size: int | None = None, scorer: str | None = None, threshold: float | None = None,
        top_words: int | None = None, max_nontoxic: int | None = None, callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """See `Client.submit_reconstruct`."""
        return await self.submit("reconstruct", idempotency_key=idempotency_key, **_reconstruct_spec(locals()))

    async def job(self, job: Job | str) -> Job:
        return Job.from_json(await self._json("GET", f"/jobs/{_job_id(job)}"))

    async def cancel(self, job: Job | str) -> Job:
        return Job.from_json(await self._json("POST", f"/jobs/{_job_id(job)}/cancel"))

    async def wait(self, job: Job | str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                   progress: bool = True) -> Job:
        """See `Client.wait`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        current = await self.job(job)
        bar = _Progress(current, progress)
        try:
            while True:
                bar.show(current)
                if current.finished:
                    return current
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"job {current.id} still {current.state} after {timeout_s:g} s", current)
                await asyncio.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
                current = await self.job(current)
        finally:
            bar.close()

    async def download(self, job: Job | str, name: str, dest: str | os.PathLike[str] | None = None) -> bytes | Path:
        """See `Client.download` (the file is written as chunks arrive)."""
        path = _artifact_path(job, name)
        async with self.http.stream("GET", self.base_url + path, headers=self._headers(),
                                    timeout=self.timeout) as response:
            if not response.is_success:
                raise error_from_response(response.status_code, response.headers, await response.aread())
            if dest is None:
                return await response.aread()
            target = _destination(dest, name)
            partial = target.with_name(target.name + ".part")
            with partial.open("wb") as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
            partial.replace(target)
            return target

    async def generate(self, prompt: str | Sequence[str], *, detox: bool = True, intervention: str | None = None,
                       max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, score: bool = False) -> list[Generation]:
        """See `Client.generate`."""
        body = generate_body(prompt, detox=detox, intervention=intervention, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, score=score)
        return [Generation.from_json(g) for g in (await self._json("POST", "/generate", json=body))["data"]]

    async def moderate(self, input: str | Sequence[str], model: str | None = None) -> Moderation:
        """See `Client.moderate`."""
        body = _present({"input": input if isinstance(input, str) else list(input), "model": model})
        return Moderation.from_json(await self._json("POST", "/v1/moderations", json=body))

    async def interventions(self, model: str | None = None) -> list[Intervention]:
        data = (await self._json("GET", "/interventions", params=_present({"model": model})))["data"]
        return [Intervention.from_json(i) for i in data]

    async def health(self) -> Health:
        return Health.from_json(await self._json("GET", "/healthz"))


def _reconstruct_spec(arguments: Mapping[str, Any]) -> JSON:
    """A reconstruct spec from `submit_reconstruct`'s keyword arguments (self and the key left out)."""
    spec = {name: value for name, value in arguments.items() if name not in ("self", "idempotency_key")}
    alpha = spec.get("alpha")
    if isinstance(alpha, Sequence) and not isinstance(alpha, str):  # "auto" is a Sequence too
        spec["alpha"] = list(alpha)
    return spec

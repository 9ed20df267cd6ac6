"""Access and limits: every operation but /healthz and /readyz needs a key (401), the right scope (403) and
stays within its rate (429); caps name their limit; a full generation queue is a 503 at once."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.openapi import openapi_document
from tests.api.conftest import READER_KEY, SLOW_KEY
from workers.settings import Settings

OPEN = {"/healthz", "/readyz"}


def _operations() -> list[tuple[str, str]]:
    paths = openapi_document()["paths"]
    return [(method, re.sub(r"\{[^}]+\}", "x", path)) for path, ops in paths.items() for method in ops
            if path not in OPEN]


def test_every_closed_operation_declares_bearer_auth() -> None:
    document = openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert bool(operation.get("security")) == (path not in OPEN), f"{method} {path}"


@pytest.mark.parametrize(("method", "url"), _operations())
def test_no_key_or_a_wrong_key_is_401(client: TestClient, method: str, url: str) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic eDp5"}):
        answer = client.request(method, url, headers=headers)
        assert answer.status_code == 401, (method, url, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        if url.startswith("/v1/"):  # the OpenAI-compatible routes answer in OpenAI's envelope
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["error"]["type"] == "authentication_error"
        else:
            assert answer.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("url", sorted(OPEN))
def test_health_and_readiness_are_open(client: TestClient, url: str) -> None:
    assert client.get(url, headers={"Authorization": ""}).status_code == 200


def test_a_key_without_the_scope_is_403(client: TestClient) -> None:
    reader = {"Authorization": f"Bearer {READER_KEY}"}
    assert client.get("/jobs", headers=reader).status_code == 200
    for method, url in (("GET", "/generate?prompt=Hi"), ("POST", "/jobs/generate"), ("GET", "/metrics"),
                        ("POST", "/interventions/embedded-default/activate"), ("POST", "/score")):
        answer = client.request(method, url, headers=reader)
        assert answer.status_code == 403, (method, url, answer.text)
        assert "scope" in answer.json()["detail"]


def test_rate_limit_is_429_with_retry_after(client: TestClient) -> None:
    slow = {"Authorization": f"Bearer {SLOW_KEY}"}
    statuses = [client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 1, "detox": False},
                           headers=slow) for _ in range(3)]
    assert [a.status_code for a in statuses][-1] == 429
    limited = statuses[-1]
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit" in limited.json()["detail"]
    assert client.get("/jobs").status_code == 200  # other keys have their own bucket


@pytest.mark.parametrize(("body", "status", "limit"), [
    ({"items": [{"prompt": "x" * 501}]}, 413, "max_prompt_chars"),
    ({"items": [{"prompt": "Hi"}] * 17}, 413, "max_generate_batch"),
    ({"items": [{"prompt": "Hi", "max_new_tokens": 65}]}, 422, "max_new_tokens_limit"),
])
def test_caps_name_their_limit(client: TestClient, body: dict, status: int, limit: str) -> None:
    answer = client.post("/generate", json=body)
    assert answer.status_code == status, answer.text
    assert limit in answer.json()["detail"]


def test_body_cap_names_its_limit(client: TestClient) -> None:
    answer = client.post("/score", content=b"{" + b" " * 1_000_001 + b"}", headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "max_body_bytes" in answer.json()["detail"]


def test_full_generation_queue_is_503_at_once(client: TestClient, settings: Settings) -> None:
    batcher = client.app.state.server.batcher  # type: ignore[attr-defined]
    batcher.max_waiting = 0
    try:
        answer = client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 1})
    finally:
        batcher.max_waiting = settings.max_generate_queue
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == str(settings.retry_after_s)
    assert "max_generate_queue" in answer.json()["detail"]
    assert batcher.waiting == 0


def test_job_caps_name_their_limit(client: TestClient) -> None:
    answer = client.post("/jobs/generate", json={"prompts": {"texts": ["a"] * 51}})
    assert answer.status_code == 413, answer.text
    assert "max_job_prompts" in answer.json()["detail"]

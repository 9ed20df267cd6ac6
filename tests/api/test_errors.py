"""Bad input on every endpoint: the documented 4xx as problem+json, and nothing written."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from app.api.deps import get_service
from workers.job_service import JobService
from workers.settings import Settings

TEXTS = {"prompts": {"texts": ["hello"]}}
PIPE = {"prompts": {"path": "rtp_toxic_prompts_5000.csv"}, "train_rows": "0:8", "eval_rows": "8:12"}
ZERO_ID = "0" * 32

CASES = [
    # (method, url, json, status, field)
    ("POST", "/jobs/pipeline", {}, 422, "prompts"),
    ("POST", "/jobs/generate", {"prompts": {"texts": []}}, 422, "prompts"),
    ("POST", "/jobs/generate", {"prompts": {}}, 422, "prompts"),
    ("POST", "/jobs/generate", {"prompts": {"texts": ["a"], "path": "x.csv"}}, 422, "prompts"),
    ("POST", "/jobs/generate", {"prompts": {"texts": ["  "]}}, 422, "prompts"),
    ("POST", "/jobs/generate", {**TEXTS, "samples": "many"}, 422, "samples"),
    ("POST", "/jobs/generate", {**TEXTS, "samples": 0}, 422, "samples"),
    ("POST", "/jobs/generate", {**TEXTS, "max_new_tokens": 10**6}, 422, "max_new_tokens"),
    ("POST", "/jobs/generate", {**TEXTS, "unknown": 1}, 422, "unknown"),
    ("POST", "/jobs/generate", {**TEXTS, "model": "gpt-nope"}, 422, "model"),
    ("POST", "/jobs/generate", {**TEXTS, "rows": "5:1"}, 422, "rows"),
    ("POST", "/jobs/generate", {**TEXTS, "rows": "0:9"}, 422, "rows"),
    ("POST", "/jobs/generate", {"prompts": {"texts": ["x"] * 51}}, 413, None),
    ("POST", "/jobs/generate", {"prompts": {"texts": ["x" * 501]}}, 413, None),
    ("POST", "/jobs/generate", {"prompts": {"path": "../data/rtp_toxic_prompts_5000.csv"}}, 422, "prompts.path"),
    ("POST", "/jobs/generate", {"prompts": {"path": "/etc/passwd"}}, 422, "prompts.path"),
    ("POST", "/jobs/generate", {"prompts": {"path": "missing.csv"}}, 422, "prompts.path"),
    ("POST", "/jobs/generate", {"prompts": {"file_id": "../secret.csv"}}, 422, "prompts.file_id"),
    ("POST", "/jobs/generate", {"prompts": {"file_id": "nothere.csv"}}, 422, "prompts.file_id"),
    ("POST", "/jobs/generate", {"prompts": {"hub_dataset": "allenai/real-toxicity-prompts"}}, 422, "prompts.hub_dataset"),
    ("POST", "/jobs/extract", {**TEXTS, "scorer": "nope"}, 422, "scorer"),
    ("POST", "/jobs/extract", {"generate_job_id": ZERO_ID}, 422, "generate_job_id"),
    ("POST", "/jobs/extract", {**TEXTS, "reference_csv": "../../etc/passwd.csv"}, 422, "reference_csv"),
    ("POST", "/jobs/reconstruct", {"extract_job_id": ZERO_ID}, 422, "extract_job_id"),
    ("POST", "/jobs/reconstruct", {"extract_job_id": "../x"}, 422, "extract_job_id"),
    ("POST", "/jobs/reconstruct", {**TEXTS, "k": 3, "percentile": 0.9}, 422, "body"),
    ("POST", "/jobs/reconstruct", {**TEXTS, "alpha": "strong"}, 422, "alpha"),
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_id": "nope"}, 422, "intervention_id"),
    ("POST", "/jobs/evaluate", TEXTS, 422, "intervention_ids"),  # neither intervention_id nor intervention_ids
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_id": "embedded-default", "intervention_ids": ["embedded-default"]},
     422, "intervention_ids"),
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_ids": ["embedded-default", "embedded-default"]}, 422,
     "intervention_ids"),
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_ids": ["embedded-default", "nope"]}, 422, "intervention_ids"),
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_ids": ["embedded-default", "../x"]}, 422, "intervention_ids.1"),
    ("POST", "/jobs/evaluate", {**TEXTS, "intervention_ids": [f"i{n}" for n in range(9)]}, 422, "intervention_ids"),
    ("POST", "/jobs/pipeline", {**PIPE, "eval_rows": "4:12"}, 422, "eval_rows"),
    ("POST", "/jobs/pipeline", {**PIPE, "train_rows": "0:99999"}, 422, "train_rows"),
    ("GET", f"/jobs/{ZERO_ID}", None, 404, None),
    ("GET", "/jobs/bad..id", None, 422, "job_id"),
    ("POST", f"/jobs/{ZERO_ID}/cancel", None, 404, None),
    ("GET", f"/jobs/{ZERO_ID}/artifacts/report.json", None, 404, None),
    ("GET", "/jobs?limit=0", None, 422, "limit"),
    ("GET", "/jobs?state=sleeping", None, 422, "state"),
    ("GET", "/interventions/nope", None, 404, None),
    ("POST", "/interventions/nope/activate", None, 404, None),
    ("GET", "/generate", None, 422, "prompt"),
    ("GET", "/generate?prompt=", None, 422, "prompt"),
    ("GET", "/generate?prompt=hi&max_new_tokens=65", None, 422, "max_new_tokens"),
    ("GET", "/generate?prompt=hi&max_new_tokens=ten", None, 422, "max_new_tokens"),
    ("GET", "/generate?prompt=hi&temperature=-1", None, 422, "temperature"),
    ("GET", "/generate?prompt=hi&intervention=nope", None, 422, "intervention"),
    ("GET", "/generate?prompt=hi&intervention=../x", None, 422, "intervention"),
    ("GET", "/generate?prompt=" + "x" * 501, None, 413, None),
    ("POST", "/generate", {"items": []}, 422, "items"),
    ("POST", "/generate", {"items": [{"prompt": "hi"}] * 17}, 413, None),
    ("POST", "/generate", {"items": [{"prompt": "hi", "top_p": 0}]}, 422, "items.0.top_p"),
    ("POST", "/score", {"texts": []}, 422, "texts"),
    ("POST", "/score", {"texts": ["x"] * 17}, 413, None),
    ("POST", "/score", {"texts": "not a list"}, 422, "texts"),
    ("GET", "/nowhere", None, 404, None),
]


def _snapshot(redis_client: redis.Redis, settings: Settings) -> tuple[set[str], set[str]]:
    files = {str(p.relative_to(settings.data_dir)) for p in settings.artifacts_dir.rglob("*")} \
        if settings.artifacts_dir.exists() else set()
    return set(redis_client.keys("eigenshift:job:*")) | set(redis_client.keys("eigenshift:idem:*")), files


def assert_problem(response, status: int, field: str | None = None) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == status
    assert "Traceback" not in response.text
    if field is not None:
        assert body["field"] == field, body
    return body


@pytest.mark.parametrize(("method", "url", "body", "status", "field"), CASES, ids=[f"{c[0]} {c[1][:40]} {c[3]}" for c in CASES])
def test_bad_input_is_a_problem_and_writes_nothing(client: TestClient, redis_client: redis.Redis, settings: Settings,
                                                   method: str, url: str, body: object, status: int,
                                                   field: str | None) -> None:
    before = _snapshot(redis_client, settings)
    assert_problem(client.request(method, url, json=body), status, field)
    assert _snapshot(redis_client, settings) == before


def test_dot_dot_in_an_artifact_name(client: TestClient) -> None:
    job = client.get("/jobs", params={"limit": 1}).json()["data"]
    job_id = job[0]["id"] if job else ZERO_ID
    response = client.get(f"/jobs/{job_id}/artifacts/extract%2F..%2F..%2Fredis.sock")
    assert response.status_code in (404, 422)
    assert_problem(response, response.status_code)


def test_body_over_the_limit(client: TestClient) -> None:
    response = client.post("/score", content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert_problem(response, 413)


def test_upload_checks_its_name(client: TestClient) -> None:
    assert_problem(client.post("/files", files={"file": ("prompts.exe", b"x")}), 422, "file")
    uploaded = client.post("/files", files={"file": ("prompts.txt", b"first prompt\nsecond prompt\n")})
    assert uploaded.status_code == 201 and uploaded.json()["id"].endswith(".txt")


@pytest.fixture
def broken_redis(client: TestClient, settings: Settings) -> Iterator[None]:
    dead = settings.model_copy(update={"redis_url": f"unix://{settings.data_dir}/no-such.sock", "redis_timeout_s": 0.5})
    client.app.dependency_overrides[get_service] = lambda: JobService(dead)  # type: ignore[attr-defined]
    yield
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("broken_redis")
@pytest.mark.parametrize(("method", "url", "body"), [
    ("POST", "/jobs/generate", {"prompts": {"texts": ["hi"]}}), ("GET", f"/jobs/{ZERO_ID}", None),
    ("GET", "/jobs", None), ("GET", "/interventions", None), ("GET", "/generate?prompt=hi", None),
])
def test_redis_unreachable_is_503_with_retry_after(client: TestClient, method: str, url: str, body: object) -> None:
    response = client.request(method, url, json=body)
    assert_problem(response, 503)
    assert int(response.headers["retry-after"]) > 0


def test_no_live_worker_is_503(client: TestClient, settings: Settings) -> None:
    elsewhere = settings.model_copy(update={"key_prefix": "nobody-home"})
    client.app.dependency_overrides[get_service] = lambda: JobService(elsewhere)  # type: ignore[attr-defined]
    try:
        response = client.post("/jobs/generate", json={"prompts": {"texts": ["hi"]}})
    finally:
        client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
    assert_problem(response, 503)
    assert "worker" in response.json()["detail"]

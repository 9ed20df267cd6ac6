"""Keys are kept apart: jobs, uploads, job-built interventions and Idempotency-Keys belong to the key that made
them; another key gets what it would get for an id that does not exist (404 on paths), never sees them listed;
an admin sees everything.

Jobs here go to a queue no worker consumes (the app's job service is swapped for one on a parked queue), so
they stay queued and cost no model time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.deps import get_service
from tests.api.conftest import ALICE_KEY, BOB_KEY
from workers.interventions import BUILTIN_ID
from workers.job_service import JobService
from workers.settings import Settings

ALICE, BOB = {"Authorization": f"Bearer {ALICE_KEY}"}, {"Authorization": f"Bearer {BOB_KEY}"}
GENERATE = {"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1}


@pytest.fixture
def parked(client: TestClient, settings: Settings) -> Iterator[JobService]:
    service = JobService(settings.model_copy(update={"queue": "parked"}))
    client.app.dependency_overrides[get_service] = lambda: service  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        client.app.dependency_overrides.pop(get_service, None)  # type: ignore[attr-defined]


def _submit(client: TestClient, headers: dict[str, str], body: dict | None = None, **extra: str) -> str:
    answer = client.post("/jobs/generate", json=body or GENERATE, headers={**headers, **extra})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _ids(client: TestClient, url: str, headers: dict[str, str] | None = None) -> set[str]:
    return {item["id"] for item in client.get(url, params={"limit": 500} if url == "/jobs" else None,
                                              headers=headers or {}).json()["data"]}


def test_another_keys_job_is_404_and_unlisted_and_admin_sees_both(client: TestClient, parked: JobService) -> None:
    mine, theirs = _submit(client, ALICE), _submit(client, BOB)
    assert client.get(f"/jobs/{mine}", headers=ALICE).status_code == 200
    for method, url in (("GET", f"/jobs/{mine}"), ("POST", f"/jobs/{mine}/cancel"),
                        ("GET", f"/jobs/{mine}/artifacts/generate/generate.json")):
        answer = client.request(method, url, headers=BOB)
        missing = client.request(method, url.replace(mine, "0" * 32), headers=BOB)
        assert answer.status_code == missing.status_code == 404, (url, answer.text)
        assert answer.json()["type"] == missing.json()["type"]
    listed = _ids(client, "/jobs", BOB)
    assert theirs in listed and mine not in listed
    assert mine in _ids(client, "/jobs", ALICE) and theirs not in _ids(client, "/jobs", ALICE)
    assert {mine, theirs} <= _ids(client, "/jobs")  # the admin key
    assert client.get(f"/jobs/{mine}").status_code == 200


def test_another_key_cannot_cancel_a_queued_job(client: TestClient, parked: JobService) -> None:
    job_id = _submit(client, ALICE)
    assert client.post(f"/jobs/{job_id}/cancel", headers=BOB).status_code == 404
    assert client.get(f"/jobs/{job_id}", headers=ALICE).json()["state"] == "queued"
    answer = client.post(f"/jobs/{job_id}/cancel", headers=ALICE)
    assert answer.status_code == 202 and answer.json()["state"] == "cancelled"


def test_another_keys_artifacts_are_404(client: TestClient, parked: JobService) -> None:
    job_id = _submit(client, ALICE)

    def add(record) -> None:  # type: ignore[no-untyped-def]
        record.artifacts.append("generate/generate.json")

    parked.jobs.update(job_id, add)
    parked.store.put_bytes(f"jobs/{job_id}/generate/generate.json", b'{"secret": true}')
    url = f"/jobs/{job_id}/artifacts/generate/generate.json"
    assert client.get(url, headers=ALICE).json() == {"secret": True}
    assert client.get(url).status_code == 200  # the admin key
    answer = client.get(url, headers=BOB)
    assert answer.status_code == 404 and "secret" not in answer.text


def test_another_keys_upload_is_refused_as_a_missing_one(client: TestClient, parked: JobService) -> None:
    upload = client.post("/files", files={"file": ("p.txt", b"hello\nworld\n", "text/plain")}, headers=ALICE)
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    before = parked.jobs.list(limit=10**6)[1]
    for source in ({"prompts": {"file_id": file_id}}, {"prompts": {"texts": ["a"]}, "ppl_text": {"file_id": file_id},
                                                        "intervention_id": BUILTIN_ID}):
        url = "/jobs/generate" if "ppl_text" not in source else "/jobs/evaluate"
        body = {**GENERATE, **source} if url == "/jobs/generate" else source
        answer = client.post(url, json=body, headers=BOB)
        missing = client.post(url, json=_replace_file_id(body, "f" * 32 + ".txt"), headers=BOB)
        assert answer.status_code == missing.status_code == 422, answer.text
        assert answer.json()["field"] == missing.json()["field"] and file_id not in answer.json()["field"]
    assert parked.jobs.list(limit=10**6)[1] == before  # nothing recorded
    assert _submit(client, ALICE, {**GENERATE, "prompts": {"file_id": file_id}})  # its owner may use it
    assert _submit(client, {}, {**GENERATE, "prompts": {"file_id": file_id}})  # and so may the admin


def _replace_file_id(body: dict, file_id: str) -> dict:
    return {key: ({**value, "file_id": file_id} if isinstance(value, dict) and "file_id" in value else value)
            for key, value in body.items()}


def test_another_keys_job_cannot_feed_a_step(client: TestClient, parked: JobService) -> None:
    job_id = _submit(client, ALICE)
    for url, field in (("/jobs/extract", "generate_job_id"), ("/jobs/reconstruct", "extract_job_id")):
        answer = client.post(url, json={field: job_id}, headers=BOB)
        missing = client.post(url, json={field: "0" * 32}, headers=BOB)
        assert answer.status_code == missing.status_code == 422 and answer.json()["field"] == field, answer.text
        assert answer.json()["detail"] == missing.json()["detail"].replace("0" * 32, job_id)


def test_idempotency_keys_are_namespaced_per_key(client: TestClient, parked: JobService) -> None:
    first = _submit(client, ALICE, **{"Idempotency-Key": "shared-key"})
    assert _submit(client, ALICE, **{"Idempotency-Key": "shared-key"}) == first  # a replay by its owner
    replayed = client.post("/jobs/generate", json=GENERATE, headers={**BOB, "Idempotency-Key": "shared-key"})
    assert replayed.status_code == 202 and replayed.json()["id"] != first  # bob's own, new job
    other_body = client.post("/jobs/generate", json={**GENERATE, "seed": 7},
                             headers={**BOB, "Idempotency-Key": "only-alice-uses-this"})
    _submit(client, ALICE, **{"Idempotency-Key": "only-alice-uses-this"})
    assert other_body.status_code == 202  # never a 409 that would reveal alice's key
    again = client.post("/jobs/generate", json={**GENERATE, "seed": 8},
                        headers={**ALICE, "Idempotency-Key": "only-alice-uses-this"})
    assert again.status_code == 409  # alice's own conflict is still one


@pytest.fixture
def alices_intervention(client: TestClient, default_intervention: Path) -> str:
    registry = client.app.state.service.interventions  # type: ignore[attr-defined]
    registry.register("alice-built", default_intervention, model="embedded", owner="alice", job_id="a" * 32)
    return "alice-built"


def test_another_keys_intervention_is_unknown_everywhere(client: TestClient, parked: JobService,
                                                        alices_intervention: str) -> None:
    mine, unknown = alices_intervention, "nobody-built"
    assert client.get(f"/interventions/{mine}", headers=ALICE).status_code == 200
    assert client.get(f"/interventions/{mine}", headers=BOB).status_code == 404
    assert mine not in _ids(client, "/interventions", BOB) and BUILTIN_ID in _ids(client, "/interventions", BOB)
    assert {mine, BUILTIN_ID} <= _ids(client, "/interventions", ALICE) and mine in _ids(client, "/interventions")

    def generate(name: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        return client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 1, "intervention": name},
                          headers=headers)

    assert generate(mine, ALICE).status_code == 200
    refused, missing = generate(mine, BOB), generate(unknown, BOB)
    assert refused.status_code == missing.status_code == 422 and refused.json()["field"] == "intervention"

    def chat(model: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        return client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})

    assert chat(f"embedded:{mine}", ALICE).status_code == 200
    for answer in (chat(f"embedded:{mine}", BOB), chat(f"embedded:{unknown}", BOB)):
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert f"embedded:{mine}" not in {card["id"] for card in client.get("/v1/models", headers=BOB).json()["data"]}

    body = {"prompts": {"texts": ["a"]}, "intervention_id": mine}
    answer = client.post("/jobs/evaluate", json=body, headers=BOB)
    assert answer.status_code == 422 and answer.json()["field"] == "intervention_id", answer.text
    assert client.post("/jobs/evaluate", json=body, headers=ALICE).status_code == 202


def test_every_compared_intervention_must_be_visible_to_the_caller(client: TestClient, parked: JobService,
                                                                   alices_intervention: str) -> None:
    body = {"prompts": {"texts": ["a"]}, "intervention_ids": [BUILTIN_ID, alices_intervention]}
    refused = client.post("/jobs/evaluate", json=body, headers=BOB)
    assert refused.status_code == 422 and refused.json()["field"] == "intervention_ids", refused.text
    assert alices_intervention in refused.json()["detail"]
    accepted = client.post("/jobs/evaluate", json=body, headers=ALICE)
    assert accepted.status_code == 202 and accepted.json()["params"]["intervention_ids"] == body["intervention_ids"]


def test_an_activated_intervention_is_everyones(client: TestClient, alices_intervention: str) -> None:
    try:
        assert client.post(f"/interventions/{alices_intervention}/activate").status_code == 200
        assert client.get(f"/interventions/{alices_intervention}", headers=BOB).status_code == 200
    finally:
        assert client.post(f"/interventions/{BUILTIN_ID}/activate").status_code == 200
    assert client.get(f"/interventions/{alices_intervention}", headers=BOB).status_code == 404

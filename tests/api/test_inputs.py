"""Hand-written hostile inputs: every one is a 4xx problem, never a 5xx, and writes no job."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import wait_for_job

PIPELINE = {"prompts": {"texts": ["a", "b"]}, "train_rows": "0:1", "eval_rows": "1:2"}


@pytest.mark.parametrize("change", [
    {"alpha": "NaN"}, {"alpha": "Infinity"}, {"alpha": "-Infinity"}, {"alpha": []},
    {"k": 0}, {"k": -1}, {"k": 10**9},
    {"train_rows": "-1:2"}, {"train_rows": "a:b"},
])
def test_bad_pipeline_fields_are_422(client: TestClient, change: dict) -> None:
    answer = client.post("/jobs/pipeline", json={**PIPELINE, **change})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"


def test_nan_alpha_as_a_raw_json_token_is_422(client: TestClient) -> None:
    body = b'{"prompts": {"texts": ["a", "b"]}, "train_rows": "0:1", "eval_rows": "1:2", "alpha": NaN}'
    answer = client.post("/jobs/pipeline", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text


@pytest.mark.parametrize("text", ["a\x00b", "\u202eevil\u202c", "\ud800", "x\udfff", "🙂" * 8, "line\n" * 10_000])
def test_unicode_and_huge_prompts_never_5xx(client: TestClient, text: str) -> None:
    for method, url, body in (("POST", "/score", {"texts": [text]}),
                              ("POST", "/generate", {"items": [{"prompt": text, "max_new_tokens": 1, "detox": False}]})):
        # ASCII-escaped JSON: a lone surrogate travels as `\ud800`, as a hostile client would send it.
        answer = client.request(method, url, content=json.dumps(body), headers={"content-type": "application/json"})
        assert answer.status_code < 500, (url, answer.text)


def test_a_megabyte_of_emoji_is_413(client: TestClient) -> None:
    answer = client.post("/score", json={"texts": ["🙂" * 262_144]})
    assert answer.status_code == 413 and "max_body_bytes" in answer.json()["detail"]


def _registered_copy(client: TestClient, source: Path, target: Path, intervention_id: str,
                     spoil: Callable[[Path], None]) -> str:
    shutil.copytree(source, target)
    spoil(target)
    client.app.state.service.interventions.register(intervention_id, target, model="embedded")  # type: ignore[attr-defined]
    return intervention_id


def test_truncated_or_tampered_intervention_is_422(client: TestClient, default_intervention: Path,
                                                   tmp_path: Path) -> None:
    def truncate(directory: Path) -> None:
        tensors = directory / "intervention.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])

    def tamper(directory: Path) -> None:  # the lm_head hash no longer matches the served model
        info = json.loads((directory / "intervention.json").read_text())
        info["lm_head_sha256"] = "0" * 64
        (directory / "intervention.json").write_text(json.dumps(info))

    truncated = _registered_copy(client, default_intervention, tmp_path / "t", "truncated-x", truncate)
    tampered = _registered_copy(client, default_intervention, tmp_path / "h", "tampered-x", tamper)
    for intervention_id in (truncated, tampered):
        answer = client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 1, "intervention": intervention_id})
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == "intervention"


def test_csv_without_a_prompt_column_is_refused_clearly(client: TestClient) -> None:
    upload = client.post("/files", files={"file": ("p.csv", b"text,label\nhello,0\n", "text/csv")})
    assert upload.status_code == 201, upload.text
    answer = client.post("/jobs/generate", json={"prompts": {"file_id": upload.json()["id"]}, "max_new_tokens": 1})
    assert answer.status_code == 202, answer.text  # the file is read by the worker: the job fails and says why
    job = wait_for_job(client, answer.json()["id"])
    assert job["state"] == "failed" and job["error"]["type"] == "InputError", job
    assert "no `prompt` column" in job["error"]["message"]


def test_a_model_outside_the_allowlist_is_422_and_leaves_no_job(client: TestClient) -> None:
    before = client.get("/jobs", params={"limit": 1}).json()["count"]
    answer = client.post("/jobs/generate", json={"model": "/etc", "prompts": {"texts": ["hello"]}, "samples": 1})
    assert answer.status_code == 422
    assert answer.json()["field"] == "model" and "not allowed" in answer.json()["detail"]
    assert client.get("/jobs", params={"limit": 1}).json()["count"] == before

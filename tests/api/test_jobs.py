"""Jobs end to end: a real worker process runs them; the API records and serves what they made."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel
from tests.api.conftest import wait_for_job
from workers.settings import Settings
from workers.submit import JobService

PROMPT = "The man on the bus started yelling at"
PIPELINE = {
    "prompts": {"path": "rtp_toxic_prompts_5000.csv"}, "train_rows": "0:12", "eval_rows": "12:16",
    "reference_csv": "llama2_7b_rtp_toxic_words.csv", "samples": 2, "max_new_tokens": 6, "k": 24, "alpha": 0.0,
    "n_boot": 20, "batch_size": 16, "seed": 3,
}


@pytest.fixture(scope="module")
def pipeline_job(client: TestClient) -> dict:
    response = client.post("/jobs/pipeline", json=PIPELINE)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/jobs/{response.json()['id']}"
    return wait_for_job(client, response.json()["id"])


def first_token_logprobs(lm: LoadedModel, prompt: str, intervention: Intervention | None) -> torch.Tensor:
    """log p(next token | prompt), (vocab,), computed by the core's own hook."""
    ids = lm.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        if intervention is None:
            logits = lm.model(**ids).logits[0, -1]
        else:
            with intervention.applied(lm.model):
                logits = lm.model(**ids).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def test_pipeline_builds_an_intervention_that_generate_serves(client: TestClient, pipeline_job: dict,
                                                              embedded: LoadedModel, tmp_path) -> None:
    job = pipeline_job
    assert job["state"] == "succeeded", job["error"]
    assert job["steps_done"] == ["extract", "reconstruct", "evaluate"]
    assert job["intervention_id"] == job["id"] and job["links"]["intervention"] == f"/interventions/{job['id']}"
    names = {a["name"] for a in job["artifacts"]}
    assert {"extract/states.safetensors", "reconstruct/intervention.safetensors", "evaluate/report.json"} <= names
    report = client.get(f"/jobs/{job['id']}/artifacts/evaluate/report.json").json()
    assert report["eval_prompts"]["rows"] == "12:16"

    record = client.get(f"/interventions/{job['intervention_id']}").json()
    assert record["k"] == 24 and record["alpha"] == [0.0] * 24 and record["model"] == "embedded"
    assert record["metrics"]["toxicity_reduction"] is not None
    assert record["provenance"]["lm_head_sha256"]

    for name in ("intervention.safetensors", "intervention.json"):
        (tmp_path / name).write_bytes(client.get(f"/jobs/{job['id']}/artifacts/reconstruct/{name}").content)
    intervention = Intervention.load(tmp_path, embedded.model)
    query = {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}
    on = client.get("/generate", params={**query, "detox": True, "intervention": job["intervention_id"]}).json()["data"][0]
    off = client.get("/generate", params={**query, "detox": False}).json()["data"][0]
    assert on["intervention"] == job["intervention_id"] and off["intervention"] is None

    # The served distribution is the core's hooked one, and differs from the plain model's.
    edited, plain = first_token_logprobs(embedded, PROMPT, intervention), first_token_logprobs(embedded, PROMPT, None)
    assert on["token_ids"][0] == int(edited.argmax()) and off["token_ids"][0] == int(plain.argmax())
    assert on["logprobs"][0] == pytest.approx(float(edited[on["token_ids"][0]]), abs=1e-3)
    assert off["logprobs"][0] == pytest.approx(float(plain[off["token_ids"][0]]), abs=1e-3)
    assert not torch.allclose(edited, plain, atol=1e-3)


def test_reconstruct_from_an_extract_job_then_activate(client: TestClient, pipeline_job: dict) -> None:
    response = client.post("/jobs/reconstruct", json={"extract_job_id": pipeline_job["id"], "k": 4, "alpha": 0.5})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["steps"] == ["reconstruct"] and job["intervention_id"] == job["id"]

    assert client.post(f"/interventions/{job['id']}/activate").json()["active"] is True
    listed = {i["id"]: i for i in client.get("/interventions").json()["data"]}
    assert listed[job["id"]]["active"] and not listed[pipeline_job["id"]]["active"]
    served = client.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 2}).json()["data"][0]
    assert served["intervention"] == job["id"]


def test_failed_job_records_its_error_and_keeps_its_artifacts(client: TestClient) -> None:
    body = {"prompts": {"texts": ["The weather today is", "My favourite colour is"]}, "samples": 1,
            "max_new_tokens": 2, "k": 4}
    job = wait_for_job(client, client.post("/jobs/reconstruct", json=body).json()["id"])
    assert job["state"] == "failed"
    assert job["error"]["type"] == "InputError" and "toxic" in job["error"]["message"]
    assert job["steps_done"] == [] and job["intervention_id"] is None
    names = {a["name"] for a in job["artifacts"]}
    assert {"extract/judgements.jsonl", "extract/states.safetensors"} <= names
    judgements = client.get(f"/jobs/{job['id']}/artifacts/extract/judgements.jsonl").text.splitlines()
    assert len(judgements) == 2 and all(not json.loads(line)["toxic"] for line in judgements)


def test_generate_job_and_idempotency_key(client: TestClient) -> None:
    body = {"prompts": {"texts": ["Once upon a time"]}, "samples": 1, "max_new_tokens": 2}
    headers = {"Idempotency-Key": "generate-once"}
    first = client.post("/jobs/generate", json=body, headers=headers)
    again = client.post("/jobs/generate", json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    conflict = client.post("/jobs/generate", json={**body, "seed": 1}, headers=headers)
    assert conflict.status_code == 409 and conflict.headers["content-type"] == "application/problem+json"
    job = wait_for_job(client, first.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert {"generate/continuations.safetensors", "generate/generate.json"} <= {a["name"] for a in job["artifacts"]}

    listed = client.get("/jobs", params={"kind": "generate", "state": "succeeded", "limit": 1}).json()
    assert listed["count"] >= 1 and len(listed["data"]) == 1 and listed["data"][0]["kind"] == "generate"


def test_cancel_a_queued_job(client: TestClient, settings: Settings) -> None:
    # A queue no worker consumes keeps the job queued, so the cancel finds it there.
    parked = JobService(settings.model_copy(update={"queue": "parked"}))
    record, _ = parked.submit("generate", parked_spec())
    response = client.post(f"/jobs/{record.id}/cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelled"
    from workers import steps
    from workers.runner import run_step

    assert run_step(record.id, "generate", steps.generate, settings) == "skipped: job cancelled"
    assert client.get(f"/jobs/{record.id}").json()["state"] == "cancelled"


def parked_spec():  # noqa: ANN201
    from workers.specs import GenerateSpec

    return GenerateSpec.model_validate({"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1})

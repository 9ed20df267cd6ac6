"""Job webhooks end to end: the API checks the callback URL, the real worker POSTs the signed record when the
job ends, retries after a 500, and records every attempt. The receiver is an http.server on 127.0.0.1, which
the session's settings allow (`webhook_allowed_hosts=["127.0.0.1"]`)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from eigenshift import Job, verify_signature
from tests.api.conftest import wait_for_job
from tests.workers.test_webhooks import Receiver
from workers.jobs import JobRecord, JobStore, connect
from workers.settings import Settings

GENERATE = {"prompts": {"texts": ["Once upon a time"]}, "samples": 1, "max_new_tokens": 2}


def delivered(jobs: JobStore, job_id: str, deadline_s: float = 300) -> JobRecord:
    """Poll until an attempt succeeded or the attempts ran out (the deadline only stops a hung run)."""
    end = time.monotonic() + deadline_s
    while True:
        record = jobs.get(job_id)
        if any(d.ok for d in record.deliveries) or len(record.deliveries) >= 5 or time.monotonic() > end:
            return record
        time.sleep(0.2)


def test_a_finished_job_is_posted_signed_and_retried_after_a_500(client: TestClient, settings: Settings) -> None:
    jobs = JobStore(connect(settings), settings.key_prefix)
    with Receiver((500,)) as receiver:
        response = client.post("/jobs/generate", json={**GENERATE, "callback_url": receiver.url})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
        assert job["state"] == "succeeded", job["error"]
        record = delivered(jobs, job["id"])

    assert [(d.attempt, d.status_code, d.ok) for d in record.deliveries] == [(1, 500, False), (2, 200, True)]
    assert len({d.id for d in record.deliveries}) == 1 and len(receiver.requests) == 2
    secret = (settings.data_dir / "webhook-secret").read_text().strip()  # made by the worker at first use
    for headers, body in receiver.requests:
        assert headers["x-eigenshift-event"] == "job.succeeded"
        assert headers["x-eigenshift-delivery"] == record.deliveries[0].id
        assert verify_signature(secret, headers["x-eigenshift-timestamp"], body, headers["x-eigenshift-signature"])
        assert not verify_signature(secret, headers["x-eigenshift-timestamp"], body + b" ",
                                    headers["x-eigenshift-signature"])
        sent = Job.from_json(json.loads(body))
        assert sent.id == job["id"] and sent.state == "succeeded" and sent.params["callback_url"] == receiver.url
        assert set(sent.artifact_names) == {a["name"] for a in job["artifacts"]}


def test_a_failed_job_is_posted_as_job_failed(client: TestClient, settings: Settings) -> None:
    jobs = JobStore(connect(settings), settings.key_prefix)
    body = {"prompts": {"texts": ["The weather today is"]}, "samples": 1, "max_new_tokens": 2, "k": 4}
    with Receiver() as receiver:
        response = client.post("/jobs/reconstruct", json={**body, "callback_url": receiver.url})
        job = wait_for_job(client, response.json()["id"])
        assert job["state"] == "failed"
        record = delivered(jobs, job["id"])
    assert [(d.attempt, d.ok) for d in record.deliveries] == [(1, True)]
    headers, sent = receiver.requests[0]
    assert headers["x-eigenshift-event"] == "job.failed"
    assert json.loads(sent)["error"]["type"] == job["error"]["type"]


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://127.0.0.2:8080/hook", "http://[::1]/hook",
                                 "http://169.254.169.254/latest", "ftp://127.0.0.1/hook", "https://example.com/hook"])
def test_a_callback_off_the_allowlist_is_a_422_naming_it(client: TestClient, url: str) -> None:
    response = client.post("/jobs/generate", json={**GENERATE, "callback_url": url})
    assert response.status_code == 422 and response.json()["field"] == "callback_url"
    assert response.headers["content-type"] == "application/problem+json"

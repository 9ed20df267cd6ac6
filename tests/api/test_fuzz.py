"""schemathesis against openapi/openapi.json, over every operation, with a valid admin key: no answer is a
5xx, and every answer conforms to the schema (status, content type, body).

The fuzzed app is a second instance on its own key prefix and queue, with a stand-in worker heartbeat, so
fuzzed jobs are recorded and queued but never run, and generation is capped to a few tokens so the fixed
example budget stays cheap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from app.main import create_app
from tests.api.conftest import admin_key, serving
from workers.jobs import JobStore, connect
from workers.settings import Settings

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
EXAMPLES_PER_OPERATION = 12
schema = schemathesis.openapi.from_path(SCHEMA_PATH)
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_target(settings: Settings) -> Iterator[tuple[str, dict[str, str]]]:
    fuzz = settings.model_copy(update={
        "key_prefix": "fuzz", "queue": "fuzz", "max_new_tokens_limit": 4, "max_generate_batch": 4,
        "max_prompt_chars": 200, "rate_limit_per_s": 10_000, "rate_limit_burst": 10_000,
        "webhook_allowed_hosts": [], "request_timeout_s": 60})
    JobStore(connect(fuzz), fuzz.key_prefix).beat("fuzz-stand-in", ttl_s=3600)
    with serving(create_app(fuzz)) as url:
        yield url, {"Authorization": f"Bearer {admin_key(fuzz)}"}


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_every_operation_answers_within_its_schema(case: schemathesis.Case,
                                                   fuzz_target: tuple[str, dict[str, str]]) -> None:
    base_url, headers = fuzz_target
    case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=120)

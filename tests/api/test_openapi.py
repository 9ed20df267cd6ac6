"""The checked-in openapi/openapi.json is the app's schema (regenerate: python -m app.openapi)."""

from __future__ import annotations

from app.openapi import OPENAPI_PATH, render


def test_openapi_json_matches_the_app() -> None:
    assert OPENAPI_PATH.read_text() == render(), "openapi/openapi.json drifted: run `python -m app.openapi`"


def test_every_operation_has_a_summary_and_a_problem_free_name() -> None:
    import json

    document = json.loads(render())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description") or operation.get("summary"), f"{method} {path}"

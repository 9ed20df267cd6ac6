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


def test_openai_routes_document_openais_error_envelope_and_the_others_problem_json() -> None:
    import json

    document = json.loads(render())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status in ("4XX", "5XX"):
                content = operation["responses"][status]["content"]
                if path.startswith("/v1/"):
                    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}, \
                        f"{method} {path}"
                else:
                    assert content["application/problem+json"]["schema"]["$ref"].endswith("/ProblemDetail"), \
                        f"{method} {path}"

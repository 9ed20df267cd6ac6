"""Scorers are on an allowlist (`EIGENSHIFT_SCORERS`): a spec naming a file, a directory or a hub model that
is not on it is a 422 naming the field, before any job is recorded or anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from eigenshift_core import scoring
from workers.jobs import JobStore, connect
from workers.settings import AllowedScorer, Settings

EXTRACT = {"prompts": {"texts": ["a", "b"]}, "max_new_tokens": 1}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build a scorer from a path or the hub fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a scorer was loaded: {args}")

    monkeypatch.setattr(scoring.DetoxifyScorer, "from_checkpoint", refuse)
    monkeypatch.setattr(scoring.HFClassifierScorer, "from_pretrained", refuse)


def _refused(settings: Settings) -> list[str]:
    return ["detoxify:/etc/passwd", "hf:/root", f"detoxify:{settings.data_dir}/api-key",
            "hf:s-nlp/roberta_toxicity_classifier"]


@pytest.mark.parametrize("index", range(4))
def test_scorers_off_the_allowlist_are_422_at_submit(client: TestClient, settings: Settings, no_loading: None,
                                                     index: int) -> None:
    scorer = _refused(settings)[index]
    jobs = JobStore(connect(settings), settings.key_prefix)
    before = jobs.list(limit=10**6)[1]
    for url in ("/jobs/extract", "/jobs/reconstruct", "/jobs/pipeline"):
        body = {**EXTRACT, "scorer": scorer, **({"train_rows": "0:1", "eval_rows": "1:2"} if url == "/jobs/pipeline"
                                               else {})}
        answer = client.post(url, json=body)
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["field"] == "scorer" and "not allowed" in answer.json()["detail"]
    evaluate = client.post("/jobs/evaluate", json={**EXTRACT, "intervention_id": "embedded-default", "scorer": scorer})
    assert evaluate.status_code == 422 and evaluate.json()["field"] == "scorer", evaluate.text
    assert jobs.list(limit=10**6)[1] == before  # no job recorded
    moderation = client.post("/v1/moderations", json={"input": "hello", "model": scorer})
    assert moderation.status_code == 422 and moderation.json()["error"]["param"] == "model"


def test_a_scorer_under_an_allowed_root_passes_and_nothing_escapes_it(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, no_loading: None,
        tmp_path: Path) -> None:
    root = tmp_path / "scorers"
    (root / "classifier").mkdir(parents=True)
    (root / "model.ckpt").write_bytes(b"not read at submit")
    (root / "escape").symlink_to(settings.data_dir)
    monkeypatch.setattr(settings, "scorers", [AllowedScorer(spec="profanity"), AllowedScorer(root=root)])
    # A missing prompt file is checked after the scorer: a 422 naming it means the scorer was allowed.
    past_the_scorer = {**EXTRACT, "prompts": {"path": "no-such-file.csv"}}
    for scorer in (f"detoxify:{root}/model.ckpt", f"hf:{root}/classifier"):
        answer = client.post("/jobs/extract", json={**past_the_scorer, "scorer": scorer})
        assert answer.status_code == 422 and answer.json()["field"] == "prompts.path", (scorer, answer.text)
    for scorer in (f"detoxify:{root}/escape/api-key", f"hf:{root}/../scorers/../..", f"detoxify:{root}/missing.ckpt",
                   f"profanity:{root}/model.ckpt", "hf:/root"):
        answer = client.post("/jobs/extract", json={**past_the_scorer, "scorer": scorer})
        assert answer.status_code == 422 and answer.json()["field"] == "scorer", (scorer, answer.text)


def test_the_default_allowlist_holds_the_embedded_scorers(client: TestClient, settings: Settings) -> None:
    assert [entry.spec for entry in Settings().scorers] == ["profanity", "ensemble"]
    answer = client.post("/jobs/extract", json={**EXTRACT, "prompts": {"path": "no-such-file.csv"},
                                                "scorer": "ensemble"})
    assert answer.json()["field"] == "prompts.path", answer.text

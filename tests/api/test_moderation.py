"""POST /v1/moderations (OpenAI's shape) and POST /v1alpha1/comments:analyze (Perspective's): shapes, order,
the label mapping, thresholds, spans, error shapes, and that doNotStore texts reach no log and no store."""

from __future__ import annotations

import logging
import typing
import uuid
from collections.abc import Sequence

import httpx
import openai
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from app.api.routes import moderation as moderation_route
from app.moderation import OPENAI_SOURCES, category_scores, flag_categories, perspective_scores, toxicity_of
from eigenshift_core import scoring
from eigenshift_core.scoring import WORD_PATTERN, Scorer, WordSpan
from tests.api.conftest import READER_KEY, admin_key
from workers.settings import Settings

MODERATIONS, ANALYZE = "/v1/moderations", "/v1alpha1/comments:analyze"
TEXTS = ["What a lovely morning for a walk.", "You are a stupid fucking idiot.", "Thanks for the help, friend!",
         "Shut up, you worthless piece of shit."]
DETOXIFY = {"toxicity": 0.2, "severe_toxicity": 0.05, "obscene": 0.3, "threat": 0.7, "insult": 0.6,
            "identity_attack": 0.1, "sexual_explicit": 0.4}


class KeywordDetoxify:
    """A Detoxify-shaped scorer with no model: a label is 0.9 when the text holds its keyword, else 0.1."""

    name = "keyword-detoxify"
    KEYWORDS = {"toxicity": "idiot", "severe_toxicity": "scum", "obscene": "crap", "threat": "kill",
                "insult": "idiot", "identity_attack": "foreigners", "sexual_explicit": "naked"}

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        words = [{w.lower() for w in WORD_PATTERN.findall(text)} for text in texts]
        return [{label: 0.9 if key in found else 0.1 for label, key in self.KEYWORDS.items()} for found in words]

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [labels["toxicity"] for labels in self.score_labels(texts)]

    def attribute_words(self, text: str) -> list[WordSpan]:
        keys = set(self.KEYWORDS.values())
        return [WordSpan(m.group(), m.start(), m.end(), float(m.group().lower() in keys))
                for m in WORD_PATTERN.finditer(text)]


class FailingScorer(KeywordDetoxify):
    """Raises with the text in its message, as a careless library might."""

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        raise ValueError(f"cannot score {texts!r}")


@pytest.fixture
def keyword_scorer(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> str:
    """`keyword` registered as a scorer, allowed for /v1/moderations and served by comments:analyze."""
    monkeypatch.setitem(scoring._REGISTRY, "keyword", lambda argument, device: KeywordDetoxify())
    monkeypatch.setattr(settings, "moderation_scorers", ["profanity", "keyword"])
    monkeypatch.setattr(settings, "scorer", "keyword")
    return "keyword"


def _openai_error(answer: httpx.Response, status: int, param: str | None) -> dict:
    """OpenAI's envelope, which /v1/moderations answers errors in (the SDKs read their exceptions from it)."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] and error["code"]
    return dict(error)


def _problem(answer: httpx.Response, status: int, field: str | None) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["status"] == status and body.get("field") == field
    return body


# The mapping, as pure functions.

def test_detoxify_labels_map_onto_openai_categories() -> None:
    assert category_scores(DETOXIFY) == {"harassment": 0.6, "harassment/threatening": 0.7, "violence": 0.7,
                                         "hate": 0.1, "sexual": 0.4}
    assert category_scores({**DETOXIFY, "toxicity": 0.8})["harassment"] == 0.8  # the max of toxicity and insult


def test_jigsaw_spellings_map_like_detoxify_ones() -> None:
    jigsaw = {"toxic": 0.2, "severe_toxic": 0.05, "obscene": 0.3, "threat": 0.7, "insult": 0.6, "identity_hate": 0.1}
    assert category_scores(jigsaw) == {k: v for k, v in category_scores(DETOXIFY).items() if k != "sexual"}
    assert toxicity_of(jigsaw) == 0.2


@pytest.mark.parametrize(("labels", "toxic"), [
    ({"profanity": 0.4}, 0.4), ({"neutral": 0.3, "toxic": 0.7}, 0.7), ({"non-toxic": 0.9, "toxic": 0.1}, 0.1),
    ({"LABEL_0": 0.2, "LABEL_1": 0.8}, 0.8), (DETOXIFY, 0.2),
])
def test_a_single_p_toxic_is_harassment_and_nothing_else(labels: dict[str, float], toxic: float) -> None:
    assert toxicity_of(labels) == toxic
    if labels is not DETOXIFY:
        assert category_scores(labels) == {"harassment": toxic}  # unmeasured categories are absent, not 0
        assert perspective_scores(labels) == {"TOXICITY": toxic}


def test_detoxify_labels_serve_every_perspective_attribute() -> None:
    assert perspective_scores(DETOXIFY) == {"TOXICITY": 0.2, "SEVERE_TOXICITY": 0.05, "INSULT": 0.6, "THREAT": 0.7,
                                            "IDENTITY_ATTACK": 0.1, "PROFANITY": 0.3, "SEXUALLY_EXPLICIT": 0.4}


def test_flags_follow_thresholds_inclusively() -> None:
    scores = category_scores(DETOXIFY)
    assert flag_categories(scores, {}, 0.5) == {"harassment": True, "harassment/threatening": True,
                                                "violence": True, "hate": False, "sexual": False}
    assert flag_categories(scores, {"hate": 0.1, "violence": 0.9}, 0.5)["hate"] is True
    assert flag_categories(scores, {"hate": 0.1, "violence": 0.9}, 0.5)["violence"] is False
    assert not any(flag_categories(scores, {}, 1.01).values())


def test_threshold_settings_name_exactly_the_mapped_categories() -> None:
    keys, _ = typing.get_args(Settings.model_fields["moderation_thresholds"].annotation)
    assert set(typing.get_args(keys)) == set(OPENAI_SOURCES)


# POST /v1/moderations.

def test_one_result_per_input_in_order_with_openai_shape(client: TestClient) -> None:
    answer = client.post(MODERATIONS, json={"input": TEXTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("modr-") and body["model"] == "profanity"
    assert len(body["results"]) == len(TEXTS)
    expected = client.post("/score", json={"texts": TEXTS}).json()["scores"]
    for text, result, toxic in zip(TEXTS, body["results"], expected, strict=True):
        assert result.keys() == {"flagged", "categories", "category_scores", "eigenshift"}
        assert result["eigenshift"]["toxicity"] == pytest.approx(toxic, abs=1e-12)  # same P(toxic) as /score
        assert result["category_scores"] == {"harassment": pytest.approx(toxic, abs=1e-12)}
        assert result["categories"] == {"harassment": toxic >= 0.5}
        assert result["flagged"] is (toxic >= 0.5)
        assert result["eigenshift"]["labels"] == {"profanity": pytest.approx(toxic, abs=1e-12)}
        for span in result["eigenshift"]["spans"]:
            assert text[span["begin"]:span["end"]] == span["text"] and span["score"] > 0
    assert [r["flagged"] for r in body["results"]] == [False, True, False, True]


def test_spans_name_the_insulting_words(client: TestClient) -> None:
    result = client.post(MODERATIONS, json={"input": TEXTS[1]}).json()["results"][0]
    assert {"stupid", "idiot"} <= {span["text"].lower() for span in result["eigenshift"]["spans"]}


def test_a_batch_equals_its_texts_one_by_one(client: TestClient) -> None:
    batch = client.post(MODERATIONS, json={"input": TEXTS}).json()["results"]
    single = [client.post(MODERATIONS, json={"input": [text]}).json()["results"][0] for text in TEXTS]
    assert batch == single  # rows are scored independently: equal to the bit


def test_thresholds_come_from_settings(client: TestClient, settings: Settings,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "moderation_threshold", 0.0)
    assert all(r["flagged"] for r in client.post(MODERATIONS, json={"input": TEXTS}).json()["results"])
    monkeypatch.setattr(settings, "moderation_thresholds", {"harassment": 1.01})
    assert not any(r["flagged"] for r in client.post(MODERATIONS, json={"input": TEXTS}).json()["results"])


def test_a_detoxify_like_scorer_fills_the_mapped_categories(client: TestClient, keyword_scorer: str) -> None:
    text = "You idiot, I will kill you."
    answer = client.post(MODERATIONS, json={"input": [text, "Nice day."], "model": keyword_scorer})
    assert answer.status_code == 200, answer.text
    toxic, clean = answer.json()["results"]
    assert toxic["category_scores"] == {"harassment": 0.9, "harassment/threatening": 0.9, "violence": 0.9,
                                        "hate": 0.1, "sexual": 0.1}
    assert toxic["categories"] == {"harassment": True, "harassment/threatening": True, "violence": True,
                                   "hate": False, "sexual": False}
    assert toxic["flagged"] and not clean["flagged"]
    assert toxic["eigenshift"]["labels"] == KeywordDetoxify().score_labels([text])[0]
    assert [s["text"] for s in toxic["eigenshift"]["spans"]] == ["idiot", "kill"]


def test_the_openai_sdk_reads_the_answer(live_server: str, settings: Settings) -> None:
    sdk = openai.OpenAI(base_url=f"{live_server}/v1", api_key=admin_key(settings), max_retries=0)
    answer = sdk.moderations.create(model="profanity", input=TEXTS[:2])
    assert [r.flagged for r in answer.results] == [False, True]
    assert answer.results[1].categories.harassment is True
    assert answer.results[1].categories.hate is None  # not measured by this scorer: absent, not False
    assert answer.results[1].category_scores.harassment > 0.5


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"input": []}, 422, "input"),
    ({}, 422, "input"),
    ({"input": "hi", "model": "detoxify:/elsewhere.ckpt"}, 422, "model"),
    ({"input": "hi", "model": "omni-moderation-latest"}, 422, "model"),
    ({"input": "hi", "user": "x"}, 422, "user"),
    ({"input": ["hi"] * 17}, 413, None),
    ({"input": ["hi", "x" * 501]}, 413, None),
])
def test_bad_moderation_requests(client: TestClient, body: dict, status: int, field: str | None) -> None:
    error = _openai_error(client.post(MODERATIONS, json=body), status, field)
    if field == "model":
        assert "profanity" in error["message"]  # the allowed scorers are listed


# POST /v1alpha1/comments:analyze.

def test_perspective_shape_with_the_default_scorer(client: TestClient) -> None:
    answer = client.post(ANALYZE, json={"comment": {"text": TEXTS[1]}, "requestedAttributes": {"TOXICITY": {}},
                                        "clientToken": "t-1"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    toxic = client.post("/score", json={"texts": [TEXTS[1]]}).json()["scores"][0]
    assert body == {"attributeScores": {"TOXICITY": {"summaryScore": {"value": pytest.approx(toxic), "type": "PROBABILITY"}}},
                    "languages": ["en"], "detectedLanguages": ["en"], "clientToken": "t-1"}


def test_span_scores_are_each_word_scored_alone(client: TestClient) -> None:
    text = TEXTS[3]
    body = client.post(ANALYZE, json={"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}},
                                      "spanAnnotations": True}).json()
    spans = body["attributeScores"]["TOXICITY"]["spanScores"]
    words = [text[s["begin"]:s["end"]] for s in spans]
    assert words == WORD_PATTERN.findall(text)
    alone = client.post("/score", json={"texts": words}).json()["scores"]
    assert [s["score"]["value"] for s in spans] == pytest.approx(alone)
    assert all(s["score"]["type"] == "PROBABILITY" for s in spans)


def test_a_detoxify_like_scorer_serves_perspective_attributes(client: TestClient, keyword_scorer: str) -> None:
    text = "Foreigners are idiots, and crap."
    wanted = {"TOXICITY": {}, "INSULT": {}, "PROFANITY": {}, "IDENTITY_ATTACK": {}, "THREAT": {"scoreThreshold": 0.5}}
    answer = client.post(ANALYZE, json={"comment": {"text": text}, "requestedAttributes": wanted,
                                        "languages": ["en-US"], "spanAnnotations": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["languages"] == ["en-US"]
    scores = {name: a["summaryScore"]["value"] for name, a in body["attributeScores"].items()}
    assert scores == {"TOXICITY": 0.1, "INSULT": 0.1, "PROFANITY": 0.9, "IDENTITY_ATTACK": 0.9}  # THREAT below 0.5
    spans = body["attributeScores"]["PROFANITY"]["spanScores"]
    assert [(text[s["begin"]:s["end"]], s["score"]["value"]) for s in spans if s["score"]["value"] > 0.5] == [("crap", 0.9)]


def test_an_attribute_the_scorer_cannot_serve_is_400_naming_it(client: TestClient) -> None:
    answer = client.post(ANALYZE, json={"comment": {"text": "hello"},
                                        "requestedAttributes": {"TOXICITY": {}, "INSULT": {}, "FLIRTATION": {}}})
    problem = _problem(answer, 400, "requestedAttributes.INSULT")
    assert "INSULT" in problem["detail"] and "TOXICITY" in problem["detail"]  # what is served instead
    assert [e["field"] for e in problem["errors"]] == ["requestedAttributes.INSULT", "requestedAttributes.FLIRTATION"]


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"requestedAttributes": {"TOXICITY": {}}}, 422, "comment"),
    ({"comment": {"text": "hi"}, "requestedAttributes": {}}, 422, "requestedAttributes"),
    ({"comment": {"text": "hi"}}, 422, "requestedAttributes"),
    ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {"scoreType": "STD_DEV_SCORE"}}}, 422,
     "requestedAttributes.TOXICITY.scoreType"),
    ({"comment": {"text": "hi", "type": "HTML"}, "requestedAttributes": {"TOXICITY": {}}}, 422, "comment.type"),
    ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["en", "fr"]}, 400,
     "languages"),
    ({"comment": {"text": "x" * 501}, "requestedAttributes": {"TOXICITY": {}}}, 413, None),
])
def test_bad_analyze_requests(client: TestClient, body: dict, status: int, field: str | None) -> None:
    _problem(client.post(ANALYZE, json=body), status, field)


@pytest.mark.parametrize("url", [MODERATIONS, ANALYZE])
def test_both_routes_need_a_key_with_the_score_scope(client: TestClient, url: str) -> None:
    body = {"input": "hi", "comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}}
    refused = client.post(url, json=body, headers={"Authorization": ""})
    denied = client.post(url, json=body, headers={"Authorization": f"Bearer {READER_KEY}"})
    if url == MODERATIONS:  # OpenAI's route, OpenAI's envelope; Perspective's keeps problem+json
        assert _openai_error(refused, 401, None)["type"] == "authentication_error"
        assert "score" in _openai_error(denied, 403, None)["message"]
    else:
        _problem(refused, 401, None)
        assert "score" in _problem(denied, 403, None)["detail"]


# doNotStore: the text reaches no log and no store.

def _redis_values(store: redis.Redis, key: bytes) -> list[bytes]:
    kind = store.type(key).decode()
    if kind == "string":
        return [store.get(key)]
    if kind == "hash":
        return [part for pair in store.hgetall(key).items() for part in pair]
    if kind in ("list", "zset"):
        return store.lrange(key, 0, -1) if kind == "list" else store.zrange(key, 0, -1)
    return list(store.smembers(key)) if kind == "set" else []


def _stored_anywhere(marker: str, settings: Settings) -> bool:
    """Whether any Redis key or value, or any file under data_dir, holds `marker`."""
    store = redis.Redis.from_url(settings.redis_address)  # bytes, not decoded: values may be binary
    needle = marker.encode()
    if any(needle in key or any(needle in value for value in _redis_values(store, key))
           for key in store.scan_iter(count=1000)):
        return True
    return any(needle in path.read_bytes() for path in settings.data_dir.rglob("*") if path.is_file())


def test_do_not_store_text_is_in_no_log_no_answer_and_no_store(client: TestClient, settings: Settings,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = f"marker{uuid.uuid4().hex}"
    text = f"you idiot {marker}"
    requests = [  # (body, status): served, unserved attribute, invalid field, too long
        ({"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}}, "spanAnnotations": True}, 200),
        ({"comment": {"text": text}, "requestedAttributes": {"INSULT": {}}}, 400),
        ({"comment": {"text": text, "type": "HTML"}, "requestedAttributes": {"TOXICITY": {}}}, 422),
        ({"comment": {"text": text * 20}, "requestedAttributes": {"TOXICITY": {}}}, 413),
    ]
    for body, status in requests:
        answer = client.post(ANALYZE, json={**body, "doNotStore": True})
        assert answer.status_code == status, answer.text
        assert marker not in answer.text
    assert marker not in caplog.text
    assert not _stored_anywhere(marker, settings)


def test_a_failing_scorer_under_do_not_store_logs_no_text(live_server: str, settings: Settings,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Over real HTTP, so uvicorn's own error log is covered too."""
    def load_failing(spec: str, *, device: str | torch.device = "cpu") -> Scorer:
        return FailingScorer()

    monkeypatch.setattr(moderation_route, "load_scorer", load_failing)
    caplog.set_level(logging.DEBUG)
    uvicorn_log = logging.getLogger("uvicorn")  # it does not propagate to the root logger caplog watches
    uvicorn_log.addHandler(caplog.handler)
    try:
        _post_failing(live_server, settings, caplog)
    finally:
        uvicorn_log.removeHandler(caplog.handler)


def _post_failing(live_server: str, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    marker = f"marker{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {admin_key(settings)}"}
    body = {"comment": {"text": marker}, "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}
    answer = httpx.post(f"{live_server}{ANALYZE}", json=body, headers=headers, timeout=60)
    assert answer.status_code == 500 and marker not in answer.text
    assert "ScoringFailed" in caplog.text and "ValueError" in caplog.text  # the failure is logged, its text not
    assert marker not in caplog.text
    answer = httpx.post(f"{live_server}{ANALYZE}", json={**body, "doNotStore": False}, headers=headers, timeout=60)
    assert answer.status_code == 500
    assert marker in caplog.text  # without doNotStore the error keeps its message: the check above can fail

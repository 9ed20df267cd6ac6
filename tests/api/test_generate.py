"""/generate, /score, health and metrics on the served embedded model."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from workers.interventions import BUILTIN_ID
from workers.settings import Settings

PROMPT = "I can't believe you would say"


def test_detox_is_toggled_per_row_in_one_batch(client: TestClient) -> None:
    item = {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0, "intervention": BUILTIN_ID}
    body = {"items": [{**item, "detox": False}, {**item, "detox": True}, {**item, "detox": False},
                      {**item, "detox": True}, {"prompt": "Hello", "max_new_tokens": 1, "detox": False}]}
    data = client.post("/generate", json=body).json()["data"]
    plain, edited = data[0], data[1]
    assert plain["intervention"] is None and edited["intervention"] == BUILTIN_ID
    assert data[2]["token_ids"] == plain["token_ids"] and data[3]["token_ids"] == edited["token_ids"]
    assert plain["logprobs"][0] != edited["logprobs"][0]  # same token or not, the edited head scores it otherwise
    assert len(data[4]["token_ids"]) <= 1 and all(len(d["token_ids"]) <= 3 for d in data)


def test_requests_that_arrive_together_share_a_batch(client: TestClient) -> None:
    def batches() -> tuple[float, float]:
        lines = client.get("/metrics").text.splitlines()
        value = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("eigenshift_generate_batch_rows_")}
        return value["eigenshift_generate_batch_rows_count"], value["eigenshift_generate_batch_rows_sum"]

    count, rows = batches()
    items = [{"prompt": f"Story number {i}:", "max_new_tokens": 2, "seed": i, "temperature": 1.0} for i in range(8)]
    data = client.post("/generate", json={"items": items}).json()["data"]
    assert [d["seed"] for d in data] == list(range(8))
    new_count, new_rows = batches()
    assert new_rows - rows == 8 and new_count - count == 1  # one forward pass per step for all eight


def test_seeded_sampling_repeats(client: TestClient) -> None:
    query = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 1.0, "top_p": 0.9, "seed": 7, "detox": True}
    first, again = (client.get("/generate", params=query).json()["data"][0] for _ in range(2))
    assert first["token_ids"] == again["token_ids"] and first["seed"] == 7


def test_a_prompt_sent_again_reuses_its_prefill_and_gets_the_same_answer(client: TestClient, settings: Settings) -> None:
    server = client.app.state.server  # type: ignore[attr-defined]
    cache = server.batcher.decoder.prompt_cache
    assert cache is not None and cache.max_bytes == settings.prompt_cache_mb * 2**20 > 0
    prompt = "A prompt sent twice, word for word:"
    query = {"prompt": prompt, "max_new_tokens": 4, "temperature": 0, "detox": True}
    first = client.get("/generate", params=query).json()["data"][0]
    assert sum(key[1] == tuple(server.lm.tokenizer(prompt)["input_ids"]) for key in cache._entries) == 1
    again = client.get("/generate", params=query).json()["data"][0]
    assert again["token_ids"] == first["token_ids"] and again["text"] == first["text"]
    assert again["logprobs"] == pytest.approx(first["logprobs"], abs=1e-4)


def test_generate_can_score_and_score_ranks_toxicity(client: TestClient) -> None:
    scored = client.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 2, "score": True}).json()
    assert 0.0 <= scored["data"][0]["toxicity"] <= 1.0
    body = client.post("/score", json={"texts": ["you are a stupid fucking idiot", "have a lovely day"]}).json()
    assert body["scorer"] == "profanity" and body["scores"][0] > 0.5 > body["scores"][1]


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": True, "worker": True, "model": True}
    text = client.get("/metrics").text
    for name in ("eigenshift_http_requests_total", "eigenshift_http_request_seconds", "eigenshift_jobs{",
                 "eigenshift_queue_depth", "eigenshift_tokens_generated_total"):
        assert name in text


def test_builtin_default_is_registered_and_active(client: TestClient) -> None:
    record = client.get(f"/interventions/{BUILTIN_ID}").json()
    assert record["model"] == "embedded" and record["k"] == 8

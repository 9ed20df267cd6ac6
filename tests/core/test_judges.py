"""The `ensemble` judge: loads offline from the MiniLM wheel and the committed probe, is the mean of
alt-profanity-check and the probe (each checked against an independent computation), batches exactly,
and reproduces the agreement its record claims on the held-out reference rows."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from profanity_check import predict_prob
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from eigenshift_core import judges, scoring
from eigenshift_core.calibrate_judge import EVAL_ROWS, agreement, fit_logistic, read_reference, roc_auc
from eigenshift_core.errors import InputError
from eigenshift_core.judges import (
    PROBE_DIR,
    PROBE_RECORD,
    PROBE_WEIGHTS,
    EnsembleScorer,
    load_probe,
    minilm_dir,
)
from eigenshift_core.scoring import WORD_PATTERN, Scorer, load_scorer, toxic_words
from tests.conftest import REFERENCE_CSV

TEXTS = [
    "What a load of shit, honestly.",
    "You are a kind and thoughtful person.",
    "Shut up, you stupid idiot; nobody asked you.",
    "I don't think it's fair, but fine.",
    "",
    "a much longer sentence, so that the batch needs padding for the shorter ones around it " * 3,
]


@pytest.fixture(scope="module")
def ensemble() -> EnsembleScorer:
    scorer = load_scorer("ensemble")
    assert isinstance(scorer, EnsembleScorer)
    return scorer


def test_ensemble_loads_offline_and_scores(ensemble: EnsembleScorer) -> None:
    assert isinstance(ensemble, Scorer)
    assert ensemble.name == "ensemble"
    scores = ensemble.score_texts(TEXTS)
    assert len(scores) == len(TEXTS)
    assert all(0.0 <= p <= 1.0 for p in scores)
    assert scores[0] > 0.5 > scores[1]
    assert ensemble.score_texts([]) == []


def test_batch_equals_one_by_one(ensemble: EnsembleScorer) -> None:
    batched = ensemble.score_texts(TEXTS)
    alone = [ensemble.score_texts([text])[0] for text in TEXTS]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-6)


def test_ensemble_is_the_mean_of_its_parts(ensemble: EnsembleScorer) -> None:
    labels = ensemble.score_labels(TEXTS)
    assert list(labels[0]) == ["toxicity", "profanity", "minilm_probe"]
    np.testing.assert_allclose([row["toxicity"] for row in labels], ensemble.score_texts(TEXTS), atol=1e-12)
    np.testing.assert_allclose(
        [row["toxicity"] for row in labels],
        [(row["profanity"] + row["minilm_probe"]) / 2 for row in labels],
        atol=1e-12,
    )
    # Each part against an independent computation: the package itself, and MiniLM by hand.
    np.testing.assert_allclose([row["profanity"] for row in labels], predict_prob(TEXTS), atol=1e-12)
    np.testing.assert_allclose([row["minilm_probe"] for row in labels], probe_by_hand(TEXTS), atol=1e-5)


def probe_by_hand(texts: list[str]) -> list[float]:
    """sigmoid(w . e + b), e the unit mean of MiniLM's last hidden states, one text at a time (no padding)."""
    directory = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    tensors = load_file(PROBE_DIR / PROBE_WEIGHTS)
    out = []
    for text in texts:
        batch = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            mean = model(**batch).last_hidden_state[0].mean(0)  # (384,)
        embedding = (mean / mean.norm()).double()
        out.append(torch.sigmoid(embedding @ tensors["w"] + tensors["b"][0]).item())
    return out


def test_attribution_is_leave_one_word_out(ensemble: EnsembleScorer) -> None:
    text = TEXTS[0]
    spans = ensemble.attribute_words(text)
    assert [span.word for span in spans] == WORD_PATTERN.findall(text)
    assert all(text[span.start : span.end] == span.word for span in spans)
    shit = next(span for span in spans if span.word == "shit")
    without = text[: shit.start] + text[shit.end :]
    full, less = ensemble.score_texts([text, without])
    assert shit.score == pytest.approx(full - less, abs=1e-6)
    assert [span.word for span in toxic_words(ensemble, text, top=1)] == ["shit"]
    assert ensemble.attribute_words("") == [] and ensemble.attribute_words("?!") == []


def test_committed_probe_reproduces_its_held_out_agreement(ensemble: EnsembleScorer) -> None:
    record = load_probe().record
    assert record["data"]["sha256"] == hashlib.sha256(REFERENCE_CSV.read_bytes()).hexdigest()
    assert record["data"]["train_rows"] == "0:4000" and record["held_out"]["rows"] == "4000:5000"
    assert record["minilm"]["version"] == importlib.metadata.version(judges.MINILM_DIST)
    texts, targets = read_reference(REFERENCE_CSV, EVAL_ROWS)
    labels = ensemble.score_labels(texts)
    for part in ("profanity", "minilm_probe"):
        expected = record["held_out"][part]
        got = agreement([row[part] for row in labels], targets)
        assert got == pytest.approx(expected, abs=1e-6), part
    got = agreement([row["toxicity"] for row in labels], targets)
    assert got == pytest.approx(record["held_out"]["ensemble"], abs=1e-6)
    assert record["held_out"]["ensemble"]["auc"] > record["held_out"]["profanity"]["auc"]


def test_tampered_probe_is_refused(tmp_path: Path) -> None:
    shutil.copytree(PROBE_DIR, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / PROBE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(InputError, match="sha256") as caught:
        load_probe(tmp_path)
    assert caught.value.field == "scorer"
    (tmp_path / PROBE_RECORD).unlink()
    with pytest.raises(InputError, match="calibrate_judge"):
        load_probe(tmp_path)


def test_missing_minilm_wheel_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == judges.MINILM_DIST:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    scoring._load_cached.cache_clear()  # a scorer loaded before would hide the missing wheel
    with pytest.raises(InputError, match=f"scorer 'ensemble' needs the {judges.MINILM_DIST} wheel") as caught:
        load_scorer("ensemble")
    assert caught.value.field == "scorer"
    with pytest.raises(InputError, match="takes no argument"):
        load_scorer("ensemble:x")


def test_logistic_fit_and_auc() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = (x @ np.array([2.0, -1.0, 0.0, 0.0, 0.5]) + 0.3 + rng.logistic(size=400) > 0).astype(int)
    weight, bias = fit_logistic(x, y, 1e-3)
    # At the optimum the gradient vanishes: the intercept's component says mean(p) == mean(y).
    p = 1 / (1 + np.exp(-(x @ weight + bias)))
    assert p.mean() == pytest.approx(y.mean(), abs=1e-8)
    assert np.sign(weight[:2]).tolist() == [1.0, -1.0]
    assert fit_logistic(x, y, 1e-3)[0].tobytes() == weight.tobytes()  # deterministic
    assert roc_auc([0.1, 0.4, 0.35, 0.8], np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc([0.5, 0.5, 0.5, 0.5], np.array([0, 1, 0, 1])) == 0.5  # ties count half

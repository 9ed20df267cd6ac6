"""Scorers: profanity matches alt-profanity-check and its attribution is exact; hf and detoxify load tiny
classifiers from local files, score like their logits say, and attribute to every word."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, PreTrainedTokenizerFast

from eigenshift_core.errors import InputError
from eigenshift_core.scoring import (
    WORD_PATTERN,
    DetoxifyScorer,
    HFClassifierScorer,
    ProfanityScorer,
    Scorer,
    WordSpan,
    known_scorers,
    load_scorer,
    spans_from_pieces,
    toxic_label_index,
    toxic_words,
)

TEXTS = [
    "What a load of shit, honestly.",
    "You are a kind and thoughtful person.",
    "Shut up, you stupid idiot; nobody asked you.",
    "I don't think it's fair, but fine.",
    "",
]
SENTENCES = ["you are a nice person", "don't be an idiot, you stupid fool", "what a lovely day it is"]


def tiny_classifier(directory: Path, labels: list[str]) -> BertForSequenceClassification:
    """A word-level fast tokenizer and a 1-layer BERT classifier with `labels`, saved to `directory`."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    tokenizer.save_pretrained(directory)
    model.config.save_pretrained(directory)
    return model


def logits_of(
    model: BertForSequenceClassification, scorer: HFClassifierScorer, texts: list[str]
) -> torch.Tensor:
    batch = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits  # (texts, labels)


def assert_spans_cover_words(spans: list[WordSpan], text: str) -> None:
    assert [span.word for span in spans] == WORD_PATTERN.findall(text)
    assert all(text[span.start : span.end] == span.word for span in spans)


@pytest.fixture(scope="module")
def profanity() -> ProfanityScorer:
    scorer = load_scorer("profanity")
    assert isinstance(scorer, ProfanityScorer)
    return scorer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BertForSequenceClassification]:
    directory = tmp_path_factory.mktemp("hf")
    model = tiny_classifier(directory, ["neutral", "toxic"])
    model.save_pretrained(directory)
    return directory, model


def test_profanity_probabilities_equal_predict_prob(profanity: ProfanityScorer) -> None:
    from profanity_check import predict_prob

    assert profanity.score_texts(TEXTS) == pytest.approx(predict_prob(TEXTS).tolist(), abs=0)
    assert profanity.score_texts([]) == []
    assert profanity.score_labels(TEXTS[:1]) == [{"profanity": profanity.score_texts(TEXTS[:1])[0]}]


def test_profanity_blames_the_profane_word(profanity: ProfanityScorer) -> None:
    text = TEXTS[0]
    top = toxic_words(profanity, text, top=2)
    assert top[0].word == "shit" and text[top[0].start : top[0].end] == "shit"
    assert all(span.score > 0 for span in top) and top == sorted(top, key=lambda s: -s.score)
    assert toxic_words(profanity, text, min_score=1e9) == []


@pytest.mark.parametrize("text", TEXTS + ["Shit shit SHIT, the shitty shit!", "Ünïcödé wörds ok"])
def test_profanity_attribution_is_exact(profanity: ProfanityScorer, text: str) -> None:
    spans = profanity.attribute_words(text)
    assert_spans_cover_words(spans, text)
    # The decision function, computed independently by sklearn: the mean of the folds' LinearSVCs.
    features = profanity.vectorizer.transform([text])
    folds = [
        fold.estimator.decision_function(features)[0] for fold in profanity.model.calibrated_classifiers_
    ]
    assert profanity.decision_function([text]) == pytest.approx([np.mean(folds)], abs=1e-12)
    assert sum(span.score for span in spans) + profanity.intercept == pytest.approx(np.mean(folds), abs=1e-12)


def test_profanity_repeated_word_shares_its_feature(profanity: ProfanityScorer) -> None:
    spans = profanity.attribute_words("shit happens, shit")
    assert spans[0].word == spans[2].word == "shit" and spans[0].score == spans[2].score


def test_hf_scores_are_the_softmax_of_the_logits(hf_dir: tuple[Path, BertForSequenceClassification]) -> None:
    directory, model = hf_dir
    scorer = load_scorer("hf:" + str(directory))
    assert isinstance(scorer, HFClassifierScorer) and isinstance(scorer, Scorer)
    assert scorer is load_scorer("hf:" + str(directory))  # cached
    texts = SENTENCES + ["unknown words only"]
    expected = logits_of(model, scorer, texts).softmax(-1)  # (texts, 2)
    scorer.batch_size = 2  # padding across batches must not change anything
    assert scorer.score_texts(texts) == pytest.approx(expected[:, 1].tolist(), abs=1e-6)
    labels = scorer.score_labels(texts[:1])[0]
    assert list(labels) == ["neutral", "toxic"] and sum(labels.values()) == pytest.approx(1.0)
    assert all(0.0 <= p <= 1.0 for p in scorer.score_texts(texts)) and scorer.score_texts([]) == []


def test_hf_attribution_is_gradient_times_input(hf_dir: tuple[Path, BertForSequenceClassification]) -> None:
    directory, model = hf_dir
    scorer = load_scorer("hf:" + str(directory))
    text = "don't be an idiot, you stupid fool!"
    spans = scorer.attribute_words(text)
    assert_spans_cover_words(spans, text)
    # Independently: gradient x input per token; the tokens of words (not [CLS], ",", "!") sum to the words'.
    encoded = scorer.tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    embeds = (
        model.get_input_embeddings()(encoded["input_ids"]).detach().requires_grad_(True)
    )  # (1, tokens, d)
    model(inputs_embeds=embeds).logits[0, 1].backward()
    per_token = (embeds.grad * embeds).sum(-1)[0]  # (tokens,)
    in_words = [bool(re.fullmatch(r"[\w']+", text[s:e])) for s, e in encoded["offset_mapping"][0].tolist()]
    assert sum(in_words) == 9  # don ' t be an idiot you stupid fool
    expected = per_token[torch.tensor(in_words)].sum().item()
    assert sum(span.score for span in spans) == pytest.approx(expected, abs=1e-5)
    assert any(span.score != 0 for span in spans)


def test_detoxify_checkpoint_loads_offline_and_scores(tmp_path: Path) -> None:
    classes = ["toxic", "severe_toxic", "obscene"]
    model = tiny_classifier(tmp_path, ["LABEL_0", "LABEL_1", "LABEL_2"])
    state_dict = {**model.state_dict(), "bert.embeddings.position_ids": torch.arange(64)[None]}  # old format
    args = {
        "model_type": "bert-base-uncased",
        "model_name": "BertForSequenceClassification",
        "num_classes": 3,
    }
    config = {
        "arch": {"args": {**args, "tokenizer_name": "BertTokenizer"}},
        "dataset": {"args": {"classes": classes}},
    }
    torch.save({"config": config, "state_dict": state_dict}, tmp_path / "tiny.ckpt")

    scorer = load_scorer(f"detoxify:{tmp_path / 'tiny.ckpt'}")
    assert isinstance(scorer, DetoxifyScorer)
    expected = logits_of(model, scorer, SENTENCES).sigmoid()  # (texts, 3)
    assert scorer.score_texts(SENTENCES) == pytest.approx(expected[:, 0].tolist(), abs=1e-6)
    labels = scorer.score_labels(SENTENCES)
    assert list(labels[0]) == ["toxicity", "severe_toxicity", "obscene"]
    assert [row["obscene"] for row in labels] == pytest.approx(expected[:, 2].tolist(), abs=1e-6)
    assert_spans_cover_words(scorer.attribute_words(SENTENCES[1]), SENTENCES[1])
    # The directory holding one checkpoint names it too; or the config comes from a directory of its own.
    assert load_scorer(f"detoxify:{tmp_path}").score_texts(SENTENCES) == scorer.score_texts(SENTENCES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "tiny.ckpt").rename(elsewhere / "tiny.ckpt")
    moved = DetoxifyScorer.from_checkpoint(
        elsewhere / "tiny.ckpt", device=torch.device("cpu"), config_dir=tmp_path
    )
    assert moved.score_texts(SENTENCES) == scorer.score_texts(SENTENCES)


def test_detoxify_scores_like_the_detoxify_package(tmp_path: Path) -> None:
    """A tiny random BERT in Detoxify's checkpoint format scores the same through `Detoxify.predict`.

    Detoxify 0.5 builds a config from `model_type` with `from_pretrained` even when it is given
    `huggingface_config_path` (and then uses the path's config instead), so a hub id there needs the
    network; `model_type` is the local config directory, which both loaders accept offline.
    """
    from detoxify import Detoxify  # a dev dependency: only this test needs it

    classes = ["toxic", "severe_toxic", "obscene", "identity_hate"]
    config_dir = tmp_path / "config"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [*specials, *sorted({w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s)}), "##s"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})  # WordPiece, lower-cased
    tokenizer.save_pretrained(config_dir)
    config = BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=len(classes), initializer_range=0.3,
    )  # fmt: skip
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    state_dict = BertForSequenceClassification(config).state_dict()
    args = {
        "model_type": str(config_dir),
        "model_name": "BertForSequenceClassification",
        "tokenizer_name": "BertTokenizer",
        "num_classes": len(classes),
    }
    checkpoint = {
        "config": {"arch": {"args": args}, "dataset": {"args": {"classes": classes}}},
        "state_dict": state_dict,
    }
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    texts = [*SENTENCES, "You are Idiots!", "an unknown word: zebra", ""]

    reference = Detoxify(checkpoint=str(tmp_path / "tiny.ckpt"), huggingface_config_path=str(config_dir))
    expected = reference.predict(texts)  # {class: [P per text]}, classes renamed (toxic -> toxicity)
    ours = DetoxifyScorer.from_checkpoint(
        tmp_path / "tiny.ckpt", device=torch.device("cpu"), config_dir=config_dir
    )
    labels = ours.score_labels(texts)
    assert list(labels[0]) == list(expected) == ["toxicity", "severe_toxicity", "obscene", "identity_attack"]
    for name, probabilities in expected.items():
        assert [row[name] for row in labels] == pytest.approx(probabilities, abs=1e-5), name
    assert ours.score_texts(texts) == pytest.approx(expected["toxicity"], abs=1e-5)
    # Without a config beside the checkpoint, ours reads `model_type` (here a directory) as Detoxify does.
    spec = load_scorer(f"detoxify:{tmp_path / 'tiny.ckpt'}")
    assert spec.score_texts(texts) == pytest.approx(expected["toxicity"], abs=1e-5)
    assert len({round(p, 4) for p in expected["toxicity"]}) > 1  # the texts are told apart


def test_detoxify_without_local_config_is_an_input_error(tmp_path: Path) -> None:
    args = {"model_type": "no-such-org/no-such-model", "model_name": "BertForSequenceClassification"}
    config = {"arch": {"args": {**args, "num_classes": 1}}, "dataset": {"args": {"classes": ["toxic"]}}}
    torch.save({"config": config, "state_dict": {}}, tmp_path / "lonely.ckpt")
    with pytest.raises(InputError, match="config.json"):
        load_scorer(f"detoxify:{tmp_path / 'lonely.ckpt'}")
    torch.save({"weights": {}}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="not a Detoxify checkpoint"):
        load_scorer(f"detoxify:{tmp_path / 'other.ckpt'}")


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("profanty", "did you mean 'profanity'"),
        ("hff:some/model", "did you mean 'hf'"),
        ("detox:x.ckpt", "detoxify"),
    ],
)
def test_unknown_scorer_suggests_a_known_one(spec: str, hint: str) -> None:
    with pytest.raises(InputError, match=hint) as caught:
        load_scorer(spec)
    assert caught.value.field == "scorer"
    assert known_scorers() == ["detoxify", "ensemble", "hf", "profanity"]


@pytest.mark.parametrize(
    "spec", ["hf:", "hf:{tmp}/missing", "hf:{tmp}", "detoxify:{tmp}/none.ckpt", "profanity:x"]
)
def test_bad_scorer_specs_are_input_errors(spec: str, tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_scorer(spec.format(tmp=tmp_path))
    assert caught.value.field == "scorer"


@pytest.mark.parametrize(
    ("id2label", "index"),
    [
        ({0: "neutral", 1: "toxic"}, 1),
        ({0: "LABEL_0", 1: "LABEL_1"}, 1),
        ({0: "OFFENSIVE", 1: "NOT"}, 0),
        ({0: "non-toxic", 1: "toxic"}, 1),
        ({0: "hate", 1: "noHate", 2: "neither"}, 0),
        ({0: "yes", 1: "no"}, 1),
    ],
)
def test_toxic_label_is_found_by_name(id2label: dict[int, str], index: int) -> None:
    assert toxic_label_index(id2label) == index


def test_toxic_label_must_be_identifiable() -> None:
    with pytest.raises(InputError, match="which label"):
        toxic_label_index({0: "a", 2: "b", 3: "c"})


def test_pieces_are_summed_into_words() -> None:
    text = "Hi, you're ok"
    pieces = [
        (0, 2, 1.0),
        (2, 3, 5.0),
        (3, 7, 2.0),
        (7, 10, 0.5),
        (11, 13, -1.0),
    ]  # " you" starts with a space
    spans = spans_from_pieces(text, pieces)
    assert [(s.word, s.score) for s in spans] == [("Hi", 1.0), ("you're", 2.5), ("ok", -1.0)]
    assert re.findall(r"\w+", text[spans[1].start : spans[1].end]) == ["you", "re"]

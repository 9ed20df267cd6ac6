"""Toxicity scorers: a probability of "toxic" per text, and which words are to blame.

A scorer is named by a spec, found through a registry and loaded once per (spec, device):

- `profanity` (default): alt-profanity-check's linear SVM over TF-IDF; exact word attribution.
- `hf:<hub-id-or-dir>`: any sequence classifier, e.g. `hf:s-nlp/roberta_toxicity_classifier`.
- `detoxify:<checkpoint>`: a Detoxify `.ckpt`, loaded without the network (see `DetoxifyScorer`).
- `ensemble`: the mean of `profanity` and a logistic probe on MiniLM sentence embeddings, both embedded
  (see `eigenshift_core.judges`).

Word attribution is per word of the text (`WORD_PATTERN`, with character offsets); higher means more
to blame for "toxic". `toxic_words` keeps the positive ones.
"""

from __future__ import annotations

import bisect
import functools
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from eigenshift_core.errors import InputError, unknown_name
from eigenshift_core.loading import resolve_device

DEFAULT_SCORER = "profanity"
WORD_PATTERN = re.compile(r"\w+(?:'\w+)?")
MAX_LENGTH = 512
TOXIC_LABEL = re.compile(r"toxic|offensive|hate", re.IGNORECASE)
NEGATED_LABEL = re.compile(r"^(non|not|no)[-_ ]?(?=toxic|offensive|hate)", re.IGNORECASE)
# Detoxify renames the Jigsaw classes the same way.
DETOXIFY_RENAMES = {
    "toxic": "toxicity",
    "identity_hate": "identity_attack",
    "severe_toxic": "severe_toxicity",
}


@dataclass(frozen=True)
class WordSpan:
    """One word of a text: `text[start:end] == word`; `score` is its attribution toward "toxic"."""

    word: str
    start: int
    end: int
    score: float


@runtime_checkable
class Scorer(Protocol):
    """Scores texts for toxicity and attributes the score to words."""

    name: str

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """P(toxic) in [0, 1] per text."""
        ...

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The probability of every label the scorer knows, per text."""
        ...

    def attribute_words(self, text: str) -> list[WordSpan]:
        """Every word of `text` with its attribution toward "toxic"."""
        ...


ScorerFactory = Callable[[str, torch.device], Scorer]  # (argument after "prefix:", device) -> scorer
_REGISTRY: dict[str, ScorerFactory] = {}


def register_scorer(prefix: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Register a factory for specs `prefix` or `prefix:<argument>`."""

    def register(factory: ScorerFactory) -> ScorerFactory:
        _REGISTRY[prefix] = factory
        return factory

    return register


def known_scorers() -> list[str]:
    """The registered spec prefixes, sorted."""
    return sorted(_REGISTRY)


def load_scorer(spec: str = DEFAULT_SCORER, *, device: str | torch.device = "cpu") -> Scorer:
    """The scorer for `spec` on `device`, loaded once and cached (loading a classifier takes seconds)."""
    prefix, _, argument = spec.partition(":")
    if prefix not in _REGISTRY:
        raise unknown_name("scorer", prefix, known_scorers(), field="scorer")
    return _load_cached(prefix, argument.strip(), str(resolve_device(str(device))))


@functools.lru_cache(maxsize=8)
def _load_cached(prefix: str, argument: str, device: str) -> Scorer:
    return _REGISTRY[prefix](argument, torch.device(device))


def toxic_words(scorer: Scorer, text: str, *, top: int = 3, min_score: float = 0.0) -> list[WordSpan]:
    """The words with attribution above `min_score` (and above 0), highest first, at most `top`."""
    spans = [span for span in scorer.attribute_words(text) if span.score > max(min_score, 0.0)]
    return sorted(spans, key=lambda span: span.score, reverse=True)[:top]


def spans_from_pieces(text: str, pieces: Iterable[tuple[int, int, float]]) -> list[WordSpan]:
    """Sum scored character pieces `(start, end, score)` (tokens, features) into the words of `text`.

    A piece counts for the word holding its first character, else for the first word it overlaps
    (a subword token that starts with a space); a piece touching no word (punctuation) is dropped.
    """
    matches = list(WORD_PATTERN.finditer(text))
    starts = [match.start() for match in matches]
    scores = [0.0] * len(matches)
    for start, end, score in pieces:
        index = bisect.bisect_right(starts, start) - 1
        if index < 0 or start >= matches[index].end():
            index += 1
            if index >= len(matches) or matches[index].start() >= end:
                continue
        scores[index] += score
    return [WordSpan(m.group(), m.start(), m.end(), s) for m, s in zip(matches, scores, strict=True)]


@register_scorer("profanity")
def _load_profanity(argument: str, device: torch.device) -> Scorer:
    if argument:
        raise InputError(f"scorer 'profanity' takes no argument, got {argument!r}", field="scorer")
    return ProfanityScorer()


class ProfanityScorer:
    """alt-profanity-check: TF-IDF features, then 5 calibrated LinearSVC folds whose probabilities average.

    Probabilities are exactly `profanity_check.predict_prob` (same vectorizer and model objects).

    Attribution is exact for the linear decision function before calibration,
    `f(x) = mean_k (w_k . x + b_k) = W . x + B` over the K folds, with x the TF-IDF row of the text:
    feature j contributes `W_j * x_j`, split evenly over its occurrences (each gets `W_j * idf_j / ||tf*idf||`),
    and each occurrence counts for the word it lies in. So `sum(word scores) + intercept == f(x)`;
    stop words, unknown words and one-letter words score 0. The calibration is a monotone sigmoid per
    fold with nearly equal slopes, so the ranking of words carries over to the probability.
    """

    name = "profanity"

    def __init__(self) -> None:
        from profanity_check import profanity_check  # loads its pickles at import: pay that only here

        self.vectorizer = profanity_check.vectorizer
        self.model = profanity_check.model
        folds = [fold.estimator for fold in self.model.calibrated_classifiers_]
        self.coef = np.mean([fold.coef_[0] for fold in folds], axis=0)  # (features,)
        self.intercept = float(np.mean([fold.intercept_[0] for fold in folds]))
        self.token_pattern = re.compile(self.vectorizer.token_pattern)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        return self.model.predict_proba(self.vectorizer.transform(list(texts)))[:, 1].tolist()

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        return [{"profanity": p} for p in self.score_texts(texts)]

    def decision_function(self, texts: Sequence[str]) -> list[float]:
        """The fold-averaged LinearSVC decision function `f(x)` that `attribute_words` decomposes."""
        if not texts:
            return []
        return (self.vectorizer.transform(list(texts)) @ self.coef + self.intercept).tolist()

    def attribute_words(self, text: str) -> list[WordSpan]:
        row = self.vectorizer.transform([text])  # (1, features), sparse
        contribution = dict(
            zip(row.indices.tolist(), (row.data * self.coef[row.indices]).tolist(), strict=True)
        )
        # Tokenize as the analyzer does (lowercase, then token_pattern), keeping offsets into `text`.
        lowered = text.lower() if self.vectorizer.lowercase else text
        source = lowered if len(lowered) == len(text) else text
        occurrences: dict[int, list[tuple[int, int]]] = {}
        for match in self.token_pattern.finditer(source):
            feature = self.vectorizer.vocabulary_.get(match.group().lower())
            if feature in contribution:
                occurrences.setdefault(feature, []).append(match.span())
        pieces = [
            (start, end, contribution[feature] / len(spans))
            for feature, spans in occurrences.items()
            for start, end in spans
        ]
        return spans_from_pieces(text, pieces)


def toxic_label_index(id2label: Mapping[int, str]) -> int:
    """The label named like /toxic|offensive|hate/ (not "non-toxic"), else like /1/, else 1 of 2 labels."""
    names = {int(index): str(name) for index, name in id2label.items()}
    for pattern in (TOXIC_LABEL, re.compile("1")):
        found = [
            i for i, name in sorted(names.items()) if pattern.search(name) and not NEGATED_LABEL.search(name)
        ]
        if found:
            return found[0]
    if len(names) == 2:
        return 1
    raise InputError(f"cannot tell which label is toxic among {sorted(names.values())}", field="scorer")


class HFClassifierScorer:
    """A transformers sequence classifier; P(toxic) is the softmax (sigmoid if multi-label) of its logits.

    Word attribution is gradient x input saliency: the gradient of the toxic logit with respect to the
    input embeddings, times those embeddings, summed over the hidden dim per token, then summed into
    words through the fast tokenizer's offsets. Tokens past `max_length` are not seen, so score 0.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        name: str,
        labels: Sequence[str],
        toxic_index: int,
        activation: Literal["softmax", "sigmoid"] = "softmax",
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval().requires_grad_(False)  # gradients are taken on the inputs only
        self.tokenizer = tokenizer
        self.name = name
        self.labels = list(labels)
        self.toxic_index = toxic_index
        self.activation = activation
        self.batch_size = batch_size
        self.max_length = min(MAX_LENGTH, tokenizer.model_max_length)

    @classmethod
    def from_pretrained(cls, id_or_dir: str, *, device: torch.device) -> HFClassifierScorer:
        """Load a classifier and its tokenizer by hub id or local directory."""
        load = AutoModelForSequenceClassification.from_pretrained
        model, tokenizer = _load_pretrained(id_or_dir, lambda: load(id_or_dir))
        config = model.config
        activation: Literal["softmax", "sigmoid"] = (
            "sigmoid" if config.problem_type == "multi_label_classification" else "softmax")
        id2label: dict[int, str] = dict(config.id2label or {})  # type: ignore[assignment]
        labels = [id2label[i] for i in range(int(config.num_labels or 0))]
        toxic_index = toxic_label_index(id2label)
        return cls(
            model.to(device),  # type: ignore[arg-type]  # transformers types .to() as a decorator
            tokenizer,
            name=f"hf:{id_or_dir}",
            labels=labels,
            toxic_index=toxic_index,
            activation=activation,
        )

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return self._probabilities(texts)[:, self.toxic_index].tolist()

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        return [dict(zip(self.labels, row, strict=True)) for row in self._probabilities(texts).tolist()]

    @torch.inference_mode()
    def _probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [torch.empty(0, len(self.labels))]
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch = batch.to(self.model.device)
            logits = self.model(**batch).logits.float()  # (batch, labels)
            rows.append((logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(-1)).cpu())
        return torch.cat(rows)  # (texts, labels)

    def attribute_words(self, text: str) -> list[WordSpan]:
        if not self.tokenizer.is_fast:
            raise InputError(
                f"scorer {self.name!r} needs a fast tokenizer for word attribution", field="scorer"
            )
        encoded = self.tokenizer(
            text, truncation=True, max_length=self.max_length, return_offsets_mapping=True
        )
        offsets = encoded.pop("offset_mapping")  # (tokens, 2) character spans; (0, 0) for special tokens
        inputs = {key: torch.tensor([value], device=self.model.device) for key, value in encoded.items()}
        with torch.enable_grad():
            embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))  # (1, tokens, d)
            embeds = embeds.detach().requires_grad_(True)
            logits = self.model(inputs_embeds=embeds, **inputs).logits  # (1, labels)
            (grad,) = torch.autograd.grad(logits[0, self.toxic_index], embeds)
        saliency = (grad * embeds).sum(-1)[0].float().tolist()  # (tokens,)
        pieces = [
            (start, end, score) for (start, end), score in zip(offsets, saliency, strict=True) if end > start
        ]
        return spans_from_pieces(text, pieces)


class DetoxifyScorer(HFClassifierScorer):
    """A Detoxify checkpoint: P(toxic) is the sigmoid of its first class (`toxicity`), like `Detoxify.predict`.

    A checkpoint is `{"config": {"arch": {"args": {model_type, model_name, num_classes, ...}},
    "dataset": {"args": {"classes": [...]}}}, "state_dict": ...}`. It holds weights but no transformers
    config or tokenizer; Detoxify fetches those from the hub by `model_type`, even offline. Here they come
    from a local `config_dir` with `config.json` and tokenizer files (Detoxify's `huggingface_config_path`):
    by default the directory holding the checkpoint; if that has no `config.json`, `model_type` from the
    local Hugging Face cache. The network is never used.
    """

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: torch.device, config_dir: str | Path | None = None
    ) -> DetoxifyScorer:
        """Load `path` (a `.ckpt`, or a directory holding exactly one) with the config from `config_dir`."""
        checkpoint_path = _find_checkpoint(Path(path).expanduser())
        try:
            loaded = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            args = loaded["config"]["arch"]["args"]
            classes = [DETOXIFY_RENAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
            model_type, model_name, state_dict = args["model_type"], args["model_name"], loaded["state_dict"]
        except (KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            message = f"{checkpoint_path} is not a Detoxify checkpoint: {_first_line(error)}"
            raise InputError(message, field="scorer") from None
        model_class = getattr(transformers, model_name, None)
        if model_class is None or not model_name.endswith("ForSequenceClassification"):
            raise InputError(
                f"Detoxify checkpoint names an unknown model class {model_name!r}", field="scorer"
            )
        if config_dir is not None:
            source = str(config_dir)
        elif (checkpoint_path.parent / "config.json").is_file():
            source = str(checkpoint_path.parent)
        else:
            source = model_type  # a hub id, e.g. bert-base-uncased: only from the local cache

        def build() -> PreTrainedModel:
            config = AutoConfig.from_pretrained(source, local_files_only=True, num_labels=len(classes))
            model = model_class(config)
            result = model.load_state_dict(state_dict, strict=False)
            # Old transformers saved the `position_ids` buffer; it is not a weight either way.
            wrong = [
                k for k in result.missing_keys + result.unexpected_keys if not k.endswith("position_ids")
            ]
            if wrong:
                raise ValueError(f"checkpoint weights do not fit {model_name}: {wrong[:5]}")
            return model

        model, tokenizer = _load_pretrained(source, build, local_files_only=True)
        model = model.to(device)  # type: ignore[arg-type]  # transformers types .to() as a decorator
        return cls(
            model, tokenizer, name=f"detoxify:{path}", labels=classes, toxic_index=0, activation="sigmoid"
        )


def _find_checkpoint(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) != 1:
            raise InputError(f"expected one .ckpt file in {path}, found {len(found)}", field="scorer")
        return found[0]
    if not path.is_file():
        raise InputError(f"Detoxify checkpoint {str(path)!r} does not exist", field="scorer")
    return path


def _load_pretrained(
    source: str, build: Callable[[], PreTrainedModel], *, local_files_only: bool = False
) -> tuple[PreTrainedModel, Tokenizer]:
    """Build the model and load the tokenizer from `source`; a missing or broken source is an InputError."""
    if source.startswith((".", "/")) and not Path(source).expanduser().is_dir():
        raise InputError(f"scorer model directory {source!r} does not exist", field="scorer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = build()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        hint = " (put config.json and tokenizer files next to the checkpoint)" if local_files_only else ""
        message = f"cannot load scorer model {source!r}{hint}: {_first_line(error)}"
        raise InputError(message, field="scorer") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # decoder-style classifiers
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@register_scorer("hf")
def _load_hf(argument: str, device: torch.device) -> Scorer:
    if not argument:
        raise InputError("scorer 'hf' needs a model: hf:<hub-id-or-dir>", field="scorer")
    return HFClassifierScorer.from_pretrained(argument, device=device)


@register_scorer("ensemble")
def _load_ensemble(argument: str, device: torch.device) -> Scorer:
    from eigenshift_core.judges import load_ensemble  # it builds on this module: import it only here

    return load_ensemble(argument, device)


@register_scorer("detoxify")
def _load_detoxify(argument: str, device: torch.device) -> Scorer:
    if not argument:
        raise InputError("scorer 'detoxify' needs a checkpoint: detoxify:<path.ckpt>", field="scorer")
    return DetoxifyScorer.from_checkpoint(argument, device=device)

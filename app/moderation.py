"""Our scorers' labels as OpenAI moderation categories and Perspective attributes (pure functions).

Every scorer gives P(toxic) (`Scorer.score_texts`); Detoxify-style scorers (and HF classifiers trained on
Jigsaw's labels) give more labels. Label names are first made canonical: lowercase, with Jigsaw's spellings
renamed as Detoxify does (`toxic` -> `toxicity`, `identity_hate` -> `identity_attack`, ...).

OpenAI categories, where a label means the same thing (the score is the max over its sources):

- `harassment` <- P(toxic), `insult`. Jigsaw's "toxic" is "a rude, disrespectful or unreasonable comment",
  aimed at someone or not: of OpenAI's categories, harassment ("harassing language towards any target") is
  the nearest, and OpenAI puts insults aimed at non-protected groups there too. The same holds for the
  `profanity` scorer: despite its name, alt-profanity-check's positive class is "offensive" (trained on
  Davidson et al.'s hate/offensive tweets and Jigsaw's toxic comments, any toxic label counting), so its
  probability is a P(toxic) like the others, not a swear-word detector. A plain HF classifier's P(toxic)
  maps the same way.
- `harassment/threatening` and `violence` <- `threat`.
- `hate` <- `identity_attack`.
- `sexual` <- `sexual_explicit`.

A category no label of the scorer measures is left out (the OpenAI SDK reads it as None), never reported
as 0: `profanity` measures harassment only. `severe_toxicity`, `obscene` and any other label have no
OpenAI equivalent; every raw label is in the response's `eigenshift.labels`.

Perspective attributes: TOXICITY is P(toxic), always served; SEVERE_TOXICITY, INSULT, THREAT,
IDENTITY_ATTACK, PROFANITY (`obscene`) and SEXUALLY_EXPLICIT only when the scorer has that label.
"""

from __future__ import annotations

from collections.abc import Mapping

from eigenshift_core.scoring import DETOXIFY_RENAMES, toxic_label_index

TOXICITY = "toxicity"  # the canonical name of P(toxic)
OPENAI_SOURCES: dict[str, tuple[str, ...]] = {  # OpenAI category -> canonical labels whose max it is
    "harassment": (TOXICITY, "insult"),
    "harassment/threatening": ("threat",),
    "hate": ("identity_attack",),
    "sexual": ("sexual_explicit",),
    "violence": ("threat",),
}
PERSPECTIVE_SOURCES: dict[str, str] = {  # Perspective attribute -> canonical label
    "TOXICITY": TOXICITY,
    "SEVERE_TOXICITY": "severe_toxicity",
    "INSULT": "insult",
    "THREAT": "threat",
    "IDENTITY_ATTACK": "identity_attack",
    "PROFANITY": "obscene",
    "SEXUALLY_EXPLICIT": "sexual_explicit",
}


def toxicity_of(labels: Mapping[str, float]) -> float:
    """P(toxic) from one text's `score_labels`: the only label, else the one the scorers pick as toxic
    (`toxic_label_index`: the first named like toxic/offensive/hate), so it equals `score_texts`."""
    names = list(labels)
    if len(names) == 1:
        return labels[names[0]]
    return labels[names[toxic_label_index(dict(enumerate(names)))]]


def canonical_labels(labels: Mapping[str, float]) -> dict[str, float]:
    """Labels under canonical names, plus `toxicity` = P(toxic) (a name clash keeps the higher score)."""
    canonical: dict[str, float] = {}
    for name, score in labels.items():
        key = DETOXIFY_RENAMES.get(name.lower(), name.lower())
        canonical[key] = max(score, canonical.get(key, score))
    canonical[TOXICITY] = toxicity_of(labels)
    return canonical


def category_scores(labels: Mapping[str, float]) -> dict[str, float]:
    """The OpenAI categories the labels measure, each the max of its sources."""
    canonical = canonical_labels(labels)
    return {
        category: max(canonical[name] for name in sources if name in canonical)
        for category, sources in OPENAI_SOURCES.items()
        if any(name in canonical for name in sources)
    }


def flag_categories(scores: Mapping[str, float], thresholds: Mapping[str, float], default: float) -> dict[str, bool]:
    """Each category flagged when its score reaches its threshold (`default` where none is set)."""
    return {category: score >= thresholds.get(category, default) for category, score in scores.items()}


def perspective_scores(labels: Mapping[str, float]) -> dict[str, float]:
    """The Perspective attributes the labels serve, with their probabilities."""
    canonical = canonical_labels(labels)
    return {attribute: canonical[name] for attribute, name in PERSPECTIVE_SOURCES.items() if name in canonical}

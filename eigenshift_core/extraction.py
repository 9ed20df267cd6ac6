"""Step 2, extract: which states produced toxic words, and which produced ordinary text.

Toxic states: for each toxic word of a toxic continuation, the lm_head input just before the word's
first token (the state that chose to start the word). Optionally, as the paper did, only where the
model's own argmax there is that token (`require_argmax`), so the state really "wanted" the word.

Non-toxic states: every position of continuations judged non-toxic. They are the same model's states
on the same kind of prompts, so toxic minus non-toxic isolates what is toxic rather than what is
"a continuation of a toxic prompt". Positions of toxic continuations are left out on both sides: the
words around a toxic word are neither clean examples nor the toxic choice itself.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eigenshift_core.errors import InputError
from eigenshift_core.generation import Continuations, Span, capture_continuation_states
from eigenshift_core.loading import LoadedModel, lm_head_weight
from eigenshift_core.prompts import load_prompts
from eigenshift_core.scoring import Scorer, toxic_words
from eigenshift_core.states import StateSet


@dataclass(frozen=True)
class Judgement:
    """One continuation as the scorer saw it."""

    row: int
    prompt_index: int
    text: str
    score: float
    toxic: bool
    words: list[str]

    def to_dict(self) -> dict[str, object]:
        return {"row": self.row, "prompt_index": self.prompt_index, "text": self.text, "score": self.score,
                "toxic": self.toxic, "toxic_words": self.words}


def word_start_tokens(text: str, spans: Sequence[Span], word: str) -> list[int]:
    """Indices of the tokens holding the first character of each case-insensitive occurrence of `word`.

    Whole-word occurrences first; when there is none, the word is taken as a fragment (saliency on
    subword tokens often blames 'ulous' for 'ridiculous') and each occurrence counts from the start of
    the word that holds it. Words without a letter or digit ('"', '.') locate nothing.
    """
    needle = word.strip()
    if not re.search(r"\w", needle):
        return []
    pattern = re.escape(needle)
    starts = [m.start() for m in re.finditer(rf"(?<!\w){pattern}(?!\w)", text, flags=re.IGNORECASE)]
    if not starts:
        starts = [m.start() for m in re.finditer(rf"\w*{pattern}", text, flags=re.IGNORECASE)]
    found = []
    for char in starts:
        for index, (start, end) in enumerate(spans):
            if start <= char < end:
                found.append(index)
                break
    return found


def collect_states(
    continuations: Continuations,
    toxic_rows: Sequence[bool],
    words: Sequence[Sequence[str]],
    *,
    weight: torch.Tensor | None = None,
    require_argmax: bool = False,
    max_nontoxic: int | None = None,
    seed: int = 0,
) -> StateSet:
    """Toxic states at the first token of every occurrence of each listed word in toxic rows; non-toxic
    states at every position of the other rows, subsampled to `max_nontoxic` (seeded) to bound memory."""
    if require_argmax and weight is None:
        raise ValueError("require_argmax needs the lm_head weight")
    toxic_positions: list[tuple[int, int]] = []
    nontoxic_rows: list[int] = []
    for row in range(len(continuations)):
        if not toxic_rows[row]:
            nontoxic_rows.append(row)
            continue
        length = int(continuations.lengths[row])
        hits: set[int] = set()  # a token blamed through two listed words counts once
        for word in words[row]:
            hits.update(word_start_tokens(continuations.texts[row], continuations.spans[row][:length], word))
        toxic_positions.extend((row, index) for index in sorted(hits))
    d = continuations.states.shape[-1]
    toxic = torch.stack([continuations.states[r, i] for r, i in toxic_positions]) if toxic_positions else torch.zeros(0, d)
    toxic_tokens = torch.tensor([int(continuations.token_ids[r, i]) for r, i in toxic_positions], dtype=torch.long)
    if require_argmax and len(toxic_positions):
        assert weight is not None
        keep = (toxic.to(weight.device, weight.dtype) @ weight.T).argmax(-1).cpu() == toxic_tokens
        toxic, toxic_tokens = toxic[keep], toxic_tokens[keep]
    nontoxic = [continuations.row_states(r) for r in nontoxic_rows]
    nontoxic_tokens = [continuations.row_tokens(r) for r in nontoxic_rows]
    flat = torch.cat(nontoxic) if nontoxic else torch.zeros(0, d)
    flat_tokens = torch.cat(nontoxic_tokens) if nontoxic_tokens else torch.zeros(0, dtype=torch.long)
    if max_nontoxic is not None and flat.shape[0] > max_nontoxic:
        pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:max_nontoxic]
        flat, flat_tokens = flat[pick.sort().values], flat_tokens[pick.sort().values]
    return StateSet(toxic, toxic_tokens, flat, flat_tokens)


def judge_continuations(
    continuations: Continuations, scorer: Scorer, *, threshold: float = 0.5, top_words: int = 3, batch_size: int = 256
) -> list[Judgement]:
    """Score every continuation; for the toxic ones, name the words the scorer blames most."""
    scores: list[float] = []
    for start in range(0, len(continuations), batch_size):
        scores.extend(scorer.score_texts(continuations.texts[start : start + batch_size]))
    judgements = []
    for row, (text, score) in enumerate(zip(continuations.texts, scores, strict=True)):
        toxic = score >= threshold
        words = [w.word for w in toxic_words(scorer, text, top=top_words)] if toxic else []
        judgements.append(Judgement(row, int(continuations.prompt_index[row]), text, float(score), toxic, words))
    return judgements


def extract_states(
    lm: LoadedModel,
    continuations: Continuations,
    scorer: Scorer,
    *,
    threshold: float = 0.5,
    top_words: int = 3,
    require_argmax: bool = False,
    max_nontoxic: int | None = 200_000,
    seed: int = 0,
) -> tuple[StateSet, list[Judgement]]:
    """Judge the model's own continuations with `scorer` and collect toxic and non-toxic states."""
    judgements = judge_continuations(continuations, scorer, threshold=threshold, top_words=top_words)
    states = collect_states(
        continuations, [j.toxic for j in judgements], [j.words for j in judgements],
        weight=lm_head_weight(lm.model), require_argmax=require_argmax, max_nontoxic=max_nontoxic, seed=seed,
    )
    info = {"scorer": scorer.name, "threshold": threshold, "toxic_continuations": sum(j.toxic for j in judgements),
            "continuations": len(judgements), "require_argmax": require_argmax}
    return StateSet(states.toxic, states.toxic_tokens, states.nontoxic, states.nontoxic_tokens, info), judgements


def join_continuation(prompt: str, generation: str) -> str:
    """The reference CSV stores generations stripped; put one space back unless the junction has one."""
    if not generation or not prompt or prompt[-1].isspace() or generation[0].isspace():
        return generation
    return " " + generation


def import_reference_csv(
    lm: LoadedModel,
    path: Path,
    *,
    rows: str | None = None,
    require_argmax: bool = False,
    max_nontoxic: int | None = 200_000,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[StateSet, Continuations]:
    """States for any target model from the reference step-2 CSV (prompt, generation, label yes/no,
    toxic_words as a Python list literal), by teacher-forcing each row's generation after its prompt."""
    prompt_set = load_prompts(path, rows)
    missing = {"generation", "label", "toxic_words"} - set(prompt_set.records[0])
    if missing:
        raise InputError(f"{path} is not a step-2 CSV: missing columns {sorted(missing)}", field="prompts")
    labels, words = [], []
    for offset, record in enumerate(prompt_set.records):
        labels.append(record["label"].strip().lower() == "yes")
        try:
            listed = ast.literal_eval(record["toxic_words"] or "[]")
        except (ValueError, SyntaxError):
            raise InputError(f"row {prompt_set.start + offset}: toxic_words is not a list literal", field="prompts") from None
        words.append([str(w) for w in listed])
    continuations = capture_continuation_states(
        lm, prompt_set.texts, [join_continuation(r["prompt"], r["generation"]) for r in prompt_set.records],
        batch_size=batch_size, progress=progress, on_progress=on_progress,
    )
    states = collect_states(
        continuations, labels, words, weight=lm_head_weight(lm.model), require_argmax=require_argmax,
        max_nontoxic=max_nontoxic, seed=seed,
    )
    info = {"source": str(path), "rows": prompt_set.rows, "toxic_rows": sum(labels), "require_argmax": require_argmax}
    return StateSet(states.toxic, states.toxic_tokens, states.nontoxic, states.nontoxic_tokens, info), continuations

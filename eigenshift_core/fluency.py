"""Fluency beyond perplexity: the diversity of an arm's continuations and how often one degenerates.

Perplexity alone rewards a model that repeats itself confidently; an intervention once returned a sample
ending in ~150 commas. So each arm also reports, over the token ids of all its continuations:

- distinct-n (n = 1, 2, 3; Li et al., 2016): unique n-grams / total n-grams, pooled over every
  continuation of the arm (an n-gram never spans two continuations); 1.0 is all different, near 0 is
  the same few tokens again and again.
- repetition rate: the share of continuations in which one token occurs more than `MAX_RUN` times in a
  row (a run of at least `MAX_RUN + 1` identical ids).

Pure functions of token-id sequences: no model, no tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTINCT_NS = (1, 2, 3)
MAX_RUN = 5  # a run longer than this is degenerate repetition
PROTOCOL = {
    "distinct": "unique n-grams / total n-grams of token ids, pooled over all continuations of the arm "
                "(n-grams within a continuation), n = 1, 2, 3",
    "repetition_rate": f"share of continuations in which one token id occurs more than {MAX_RUN} times in a row",
}


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / total n-grams over all `sequences`; NaN when none is n tokens long."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def longest_run(sequence: Sequence[int]) -> int:
    """The length of the longest run of one repeated token (0 for an empty sequence)."""
    longest, run = 0, 0
    for i, token in enumerate(sequence):
        run = run + 1 if i > 0 and token == sequence[i - 1] else 1
        longest = max(longest, run)
    return longest


def repetition_rate(sequences: Sequence[Sequence[int]], max_run: int = MAX_RUN) -> float:
    """The share of `sequences` holding a run of more than `max_run` identical tokens; NaN when empty."""
    if not sequences:
        return math.nan
    return sum(longest_run(seq) > max_run for seq in sequences) / len(sequences)


def fluency_metrics(sequences: Sequence[Sequence[int]]) -> dict[str, float]:
    """`distinct_1`, `distinct_2`, `distinct_3` and `repetition_rate` of one arm's continuations."""
    return {**{f"distinct_{n}": distinct_n(sequences, n) for n in DISTINCT_NS},
            "repetition_rate": repetition_rate(sequences)}

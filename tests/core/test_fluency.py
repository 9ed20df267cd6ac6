"""Distinct-n and degenerate repetition on hand-made token sequences: exact values."""

from __future__ import annotations

import math

import pytest

from eigenshift_core.fluency import distinct_n, fluency_metrics, longest_run, repetition_rate


def test_distinct_n_pools_ngrams_over_all_continuations() -> None:
    sequences = [[1, 2, 3, 1], [1, 2, 4]]
    # unigrams: 1 2 3 1 1 2 4 -> 7 in all, {1, 2, 3, 4} unique
    assert distinct_n(sequences, 1) == pytest.approx(4 / 7)
    # bigrams: (1,2) (2,3) (3,1) | (1,2) (2,4) -> 5 in all, 4 unique; none spans the two continuations
    assert distinct_n(sequences, 2) == pytest.approx(4 / 5)
    # trigrams: (1,2,3) (2,3,1) | (1,2,4) -> 3 in all, all unique
    assert distinct_n(sequences, 3) == 1.0


def test_distinct_n_of_one_repeated_token_and_of_short_sequences() -> None:
    assert distinct_n([[7] * 10], 1) == pytest.approx(1 / 10)
    assert distinct_n([[7] * 10], 2) == pytest.approx(1 / 9)
    assert math.isnan(distinct_n([[5], [6, 6]], 3))  # no trigram at all
    assert distinct_n([[5], [6, 6]], 2) == 1.0  # only (6, 6): the single token makes no bigram
    assert math.isnan(distinct_n([], 1))
    with pytest.raises(ValueError):
        distinct_n([[1]], 0)


def test_longest_run() -> None:
    assert longest_run([]) == 0
    assert longest_run([3]) == 1
    assert longest_run([1, 1, 2, 2, 2, 1]) == 3
    assert longest_run([4, 9, 9, 9, 9, 9, 9]) == 6  # a run at the very end counts


def test_repetition_rate_counts_runs_longer_than_five() -> None:
    five = [1, 2, 2, 2, 2, 2, 3]  # 2 occurs 5 times in a row: not degenerate
    six = [1, 2, 2, 2, 2, 2, 2]  # 6 times in a row: degenerate
    commas = [11] + [13] * 150  # the sample that ended in ~150 commas
    spread = [13, 1, 13, 13, 1, 13, 13, 13]  # many 13s, never more than 3 in a row
    assert repetition_rate([five, six, commas, spread]) == pytest.approx(2 / 4)
    assert repetition_rate([five]) == 0.0
    assert repetition_rate([five], max_run=4) == 1.0
    assert math.isnan(repetition_rate([]))


def test_fluency_metrics_names_every_figure() -> None:
    metrics = fluency_metrics([[1, 2, 3, 1], [1, 2, 4]])
    assert metrics == pytest.approx({"distinct_1": 4 / 7, "distinct_2": 4 / 5, "distinct_3": 1.0,
                                     "repetition_rate": 0.0})

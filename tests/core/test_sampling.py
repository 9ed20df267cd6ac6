"""`SortFreeTopP` against transformers' `TopPLogitsWarper`: the same filtered logits, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from eigenshift_core.sampling import SortFreeTopP

VOCAB = 2000


def logit_rows(seed: int) -> torch.Tensor:
    """(8, VOCAB) rows from peaked to flat, with -inf entries and a row of many exact ties."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 1.0])[:, None]
    rows = torch.randn(8, VOCAB, generator=g) * scales
    rows[3, torch.randperm(VOCAB, generator=g)[:500]] = -float("inf")
    rows[7] = torch.randint(0, 40, (VOCAB,), generator=g).float() / 4  # 40 distinct values, ~50 of each
    return rows


@pytest.mark.parametrize("top_p", [0.0, 0.05, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_transformers_warper(top_p: float, min_tokens_to_keep: int, dtype: torch.dtype) -> None:
    for seed in range(4):
        scores = logit_rows(seed).to(dtype)
        expected = TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(None, scores.clone())
        got = SortFreeTopP(top_p, min_tokens_to_keep=min_tokens_to_keep)(None, scores.clone())
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_ties_across_the_cut_fall_back_to_the_warper() -> None:
    scores = torch.zeros(2, 10)  # a flat row: every cut falls between equal logits
    scores[1, :3] = 5.0
    expected = TopPLogitsWarper(0.5)(None, scores.clone())
    assert torch.isinf(expected[0]).sum() == 5  # the warper keeps half of the tied tokens, by its sort order
    assert torch.equal(SortFreeTopP(0.5)(None, scores.clone()), expected)


def test_rows_without_a_cut_are_untouched() -> None:
    scores = torch.tensor([[0.0, -float("inf"), 1.0], [float("nan"), 0.0, 0.0]])
    got = SortFreeTopP(0.9)(None, scores.clone())
    expected = TopPLogitsWarper(0.9)(None, scores.clone())
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))

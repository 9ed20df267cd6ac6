"""Batched nucleus sampling: the right distribution, per-row seeds, and the full-sort fallback."""

from __future__ import annotations

import pytest
import torch

from app import sampling
from app.sampling import sample_next_tokens

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))  # nucleus at top_p 0.85: tokens 0, 1, 2


def draw(n: int, *, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    logits = LOGITS.repeat(n, 1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(n)]
    return torch.tensor(sample_next_tokens(logits, [temperature] * n, [top_p] * n, generators))


@pytest.mark.parametrize("candidates", [1024, 2])  # 2 forces the full-sort fallback for top_p 0.85
def test_samples_follow_the_renormalised_nucleus(monkeypatch: pytest.MonkeyPatch, candidates: int) -> None:
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    tokens = draw(6000, top_p=0.85)
    assert set(tokens.tolist()) == {0, 1, 2}
    frequencies = torch.bincount(tokens, minlength=5).float() / len(tokens)
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert torch.allclose(frequencies, expected, atol=0.025)


def test_top_p_one_samples_the_whole_vocabulary() -> None:
    frequencies = torch.bincount(draw(6000, top_p=1.0), minlength=5).float() / 6000
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]), atol=0.025)


def test_temperature_zero_is_argmax_and_rows_are_independent() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    mixed = sample_next_tokens(logits, [0.0, 1.0, 0.0], [1.0, 0.9, 1.0],
                               [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert mixed[0] == int(logits[0].argmax()) and mixed[2] == int(logits[2].argmax())
    alone = sample_next_tokens(logits[1:2], [1.0], [0.9], [torch.Generator().manual_seed(2)])
    assert alone[0] == mixed[1]  # a row's token depends on its own seed, not on its neighbours


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 5e-5])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    tokens = sample_next_tokens(logits, [temperature] * 4, [1.0, 0.9, 1.0, 0.5],
                                [torch.Generator().manual_seed(s) for s in range(4)])
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-12])
@pytest.mark.parametrize("candidates", [1024, 2])
def test_a_tiny_top_p_keeps_only_the_top_token(monkeypatch: pytest.MonkeyPatch, top_p: float, candidates: int) -> None:
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    logits = torch.randn(8, 2000, generator=torch.Generator().manual_seed(4))
    tokens = sample_next_tokens(logits, [1.0] * 8, [top_p] * 8, [torch.Generator().manual_seed(s) for s in range(8)])
    assert tokens == logits.argmax(-1).tolist()

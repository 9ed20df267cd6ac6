"""`SortFreeTopP` against transformers' `TopPLogitsWarper` (the same filtered logits, bit for bit) and
`ReplayedMultinomial` against `torch.multinomial` (the same tokens and the same generator state after)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TopPLogitsWarper

from eigenshift_core.sampling import (
    ReplayedMultinomial,
    SortFreeTopP,
    _torch_draws_as_replayed,
    replayed_multinomial,
)

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


# --- ReplayedMultinomial: torch.multinomial's draws, replayed -----------------------------------------------------


def nucleus_probs(rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax of top-p-filtered logits: rows from peaked to flat, most entries exactly 0."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 8.0, rows, dtype=dtype)[:, None]
    logits = torch.randn(rows, vocab, generator=g, dtype=dtype) * scales
    return SortFreeTopP(0.9)(None, logits).softmax(-1)


def multinomial_and_state(probs: torch.Tensor, sample) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(99)
    torch.rand(3)  # start mid-block, not at a fresh seed
    tokens = sample(probs)
    return tokens, torch.get_rng_state()


def test_this_torch_build_draws_as_the_replay_assumes() -> None:
    assert _torch_draws_as_replayed()  # else the replay is never used (correct, but slow): see sampling.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 2), (3, 700), (16, 5000), (2, 49152)])
def test_replay_gives_torch_multinomial_tokens_and_generator_state(rows: int, vocab: int, dtype: torch.dtype) -> None:
    for seed in range(3):
        probs = nucleus_probs(rows, vocab, seed, dtype)
        expected, expected_state = multinomial_and_state(probs, lambda p: torch.multinomial(p, 1)[:, 0])
        got, state = multinomial_and_state(probs, replayed_multinomial)
        assert torch.equal(got, expected)
        assert torch.equal(state, expected_state)  # every later draw is unchanged too


def test_replay_matches_over_many_consecutive_draws() -> None:
    """Sampling the same distribution 300 times: the stream crosses many MT19937 blocks (624 words)."""
    probs = nucleus_probs(4, 300, seed=5)
    torch.manual_seed(7)
    expected = torch.stack([torch.multinomial(probs, 1)[:, 0] for _ in range(300)])
    torch.manual_seed(7)
    got = torch.stack([replayed_multinomial(probs) for _ in range(300)])
    assert torch.equal(got, expected)


def test_replay_leaves_torch_errors_to_torch() -> None:
    for bad in (torch.tensor([[0.5, float("nan")]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[-0.1, 1.1]])):
        state = torch.get_rng_state()
        with pytest.raises(RuntimeError) as expected:
            torch.multinomial(bad, 1)
        with pytest.raises(RuntimeError) as got:
            replayed_multinomial(bad)
        assert str(got.value) == str(expected.value)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn


def state_with_a_zero_draw(entry: int) -> torch.Tensor:
    """The default generator's state such that the `entry`-th next double draw is u = 0 (both its words 0:
    tempering maps 0 to 0). torch's state: 624 MT words as u64 from byte 24, `next` (u64) at byte 16."""
    torch.manual_seed(11)
    torch.rand(3)  # leave the block's start, so `next` points into the words
    state = torch.get_rng_state().numpy().copy()
    position = int(state[16:24].view(np.uint64)[0]) + 2 * entry
    state[24:24 + 624 * 8].view(np.uint64)[position : position + 2] = 0
    return torch.from_numpy(state)


@pytest.mark.parametrize("entry", [0, 3])  # outside the nucleus (p = 0: torch's 0/0 = nan wins), inside it
def test_a_zero_uniform_draw_gives_torchs_token_and_state(entry: int) -> None:
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]])
    zero_draw = state_with_a_zero_draw(entry)
    torch.set_rng_state(zero_draw)
    expected, expected_after = torch.multinomial(probs, 1)[:, 0], torch.get_rng_state()
    assert expected.tolist() == [entry]  # q = 0 there: torch picks it (nan or inf)
    torch.set_rng_state(zero_draw)
    got = replayed_multinomial(probs, torch.empty(64, dtype=torch.float64))
    assert torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), expected_after)


def test_replay_with_a_reused_buffer_equals_torch() -> None:
    probs = nucleus_probs(6, 500, seed=4)
    buffer = torch.empty(6 * 500 + 17, dtype=torch.float64)  # larger than needed: only its head is drawn into
    torch.manual_seed(2)
    expected = [torch.multinomial(probs, 1)[:, 0] for _ in range(5)]
    expected_after = torch.get_rng_state()
    torch.manual_seed(2)
    assert all(torch.equal(replayed_multinomial(probs, buffer), e) for e in expected)
    assert torch.equal(torch.get_rng_state(), expected_after)


def test_processor_leaves_only_the_drawn_token() -> None:
    scores = torch.log(nucleus_probs(5, 400, seed=2))
    torch.manual_seed(3)
    expected = torch.multinomial(scores.softmax(-1), 1)[:, 0]
    torch.manual_seed(3)
    out = ReplayedMultinomial()(None, scores)
    assert torch.equal(out.argmax(-1), expected)
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 5

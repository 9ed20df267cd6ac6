"""Sampling that gives transformers' `generate` result bit for bit, at a fraction of its CPU cost.

Two steps of a sampled decode dominate after the model's own matmuls on a CPU (32 rows of SmolLM2's 49,152
tokens): the top-p warper's argsort of the (rows, vocab) logits, and `torch.multinomial`'s exponential
draws, one per vocabulary entry per row. Each has an exact replacement here.

`SortFreeTopP`. transformers sorts every row with its indices (`torch.sort`) to find the nucleus. It needs
the indices only to map its removal mask back to the vocabulary, and the mask is always an ascending prefix
(its cumulative probabilities never decrease), so a value threshold says the same thing:
- sort the values only (numpy's vectorised sort: ~30× faster than torch's argsort here); the sorted values
  equal torch's, so softmax and cumsum over them give the same cumulative probabilities, bit for bit;
- the prefix ends at m: every token whose logit is below the first kept value is removed.
That is exact unless equal logits straddle the cut (which of them torch's sort put first decides then);
any such row, a non-CPU tensor or an unusual dtype hands the batch to transformers' own warper.

`ReplayedMultinomial`. For one sample per row, `torch.multinomial(p, 1)` is argmax(p / q) with q ~ Exp(1)
drawn for every entry, in row-major order, from the default CPU generator (an MT19937 stream; each draw
takes two 32-bit words, u = 53 of their bits / 2^53, q = -log1p(-u), rounded to p's dtype). Outside the
nucleus p is 0, so p / q is 0 and cannot win. The replay takes the same u's from the same generator with
float64 `uniform_` (the same two words per draw, the same 53 bits: no logarithms, so a third of
`exponential_`'s cost), computes q only where p > 0 and picks the same argmax; the generator ends where
torch.multinomial leaves it, so every later draw is unchanged too. Whether this torch build still draws
that way is checked once per process against `torch.multinomial` itself; if not, or for anything unusual
(a draw of exactly u = 0, non-finite or negative probabilities, another device), torch samples.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from transformers import LogitsProcessor, TopPLogitsWarper


class SortFreeTopP(LogitsProcessor):
    """`TopPLogitsWarper(top_p, min_tokens_to_keep, filter_value)` with the same output, sorting values only."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1, filter_value: float = -float("inf")) -> None:
        self.reference = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep, filter_value=filter_value)
        self.top_p, self.min_tokens_to_keep, self.filter_value = top_p, min_tokens_to_keep, filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64) or scores.dim() != 2:
            return self.reference(input_ids, scores)
        values = torch.from_numpy(np.sort(scores.detach().numpy(), axis=-1))  # (rows, vocab) ascending
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)  # what the warper computes on torch.sort's values
        # The warper removes `cumulative <= 1 - top_p` (a prefix: the cumsum never decreases), except the
        # last min_tokens_to_keep; the bound is compared in the scores' dtype, as torch compares a scalar.
        bound = torch.full((values.shape[0], 1), 1 - self.top_p, dtype=cumulative.dtype)
        removed = torch.searchsorted(cumulative, bound, right=True)[:, 0]  # (rows,) removed prefix length
        removed = removed.clamp(max=max(values.shape[-1] - self.min_tokens_to_keep, 0))
        kept_from = removed.clamp(max=values.shape[-1] - 1)[:, None]
        first_kept = values.gather(1, kept_from)  # (rows, 1)
        last_removed = values.gather(1, (removed - 1).clamp(min=0)[:, None])
        cut = removed[:, None] > 0
        if bool((cut & (last_removed == first_kept)).any()):  # tied logits straddle the cut: order decides
            return self.reference(input_ids, scores)
        threshold = torch.where(cut, first_kept, torch.full_like(first_kept, -float("inf")))
        kept = np.where(scores.numpy() < threshold.numpy(), np.asarray(self.filter_value, scores.numpy().dtype),
                        scores.numpy())  # scores.masked_fill(scores < threshold, filter_value), at ~60 % of its cost
        return torch.from_numpy(kept)  # type: ignore[return-value]


class ReplayedMultinomial(LogitsProcessor):
    """The last processor of a sampled `generate` that runs greedily (`do_sample=False`): it samples each row
    as generate's sampling step would (softmax of the processed scores, then `torch.multinomial(probs, 1)`
    on `generator`, by default the default generator), through `replayed_multinomial`, and leaves only that
    token finite, so generate's argmax takes it. With a generator of its own, a generate may run beside
    others in threads: seeded alike, it draws what the default generator would."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.uniform = torch.empty(0, dtype=torch.float64)  # reused by every step of one generate
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.uniform.numel() < scores.numel():
            self.uniform = torch.empty(scores.numel(), dtype=torch.float64)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        tokens = replayed_multinomial(probs, self.uniform, self.generator)  # (rows,)
        chosen = torch.full_like(scores, -float("inf"))
        return chosen.scatter_(1, tokens[:, None].to(scores.device), 0.0)  # type: ignore[return-value]


_NEAR_TIE = 1e-5  # candidates this close to their row's best get q from libm's log1p, as torch computes it


def replayed_multinomial(probs: torch.Tensor, uniform: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`torch.multinomial(probs, 1, generator=generator)[:, 0]` for probs (rows, vocab): the same tokens and
    the same generator state afterwards (default: the default generator of probs' device), with exponentials
    computed only where probs > 0 (on a CPU). uniform: an optional float64 buffer of at least rows·vocab entries for the draws
    (overwritten)."""
    tokens = None
    if _replayable(probs) and _torch_draws_as_replayed():
        tokens = _replay(probs, torch.default_generator if generator is None else generator, uniform)
    # No generator: the probabilities' device's default one (a CUDA tensor draws from CUDA's).
    return torch.multinomial(probs, 1, generator=generator)[:, 0] if tokens is None else tokens


def _replayable(probs: torch.Tensor) -> bool:
    return (probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64) and probs.dim() == 2
            and probs.is_contiguous() and not probs.requires_grad)


def _replay(probs: torch.Tensor, generator: torch.Generator, uniform: torch.Tensor | None = None) -> torch.Tensor | None:
    """The tokens, with `generator` advanced past the draws; None (the generator as it was) where
    torch must sample: non-finite, negative or all-zero rows (its checks raise its errors) or a u = 0 draw."""
    rows, vocab = probs.shape
    p = probs.numpy()
    flat = np.flatnonzero(p != 0)  # (n,) the nucleus, row-major (nan counts as nonzero: caught below)
    row, token = np.divmod(flat, vocab)
    values = p.reshape(-1)[flat]  # (n,)
    if np.bincount(row, minlength=rows).min() == 0 or not (np.isfinite(values).all() and (values > 0).all()):
        return None
    before = generator.get_state()
    if uniform is None or uniform.numel() < rows * vocab:
        uniform = torch.empty(rows * vocab, dtype=torch.float64)
    u = uniform[: rows * vocab].uniform_(generator=generator).numpy()  # (rows·vocab,) entry i's u, as exponential_ draws it
    if not u.all():  # u = 0 outside the nucleus makes p / q = 0 / 0 = nan, which torch's argmax would pick
        generator.set_state(before)
        return None
    drawn = u[flat]  # (n,)
    ratio = values / (-np.log1p(-drawn)).astype(p.dtype)  # (n,) p / q, divided in p's dtype as torch does
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])  # (rows,) each row's first nucleus position
    counts = np.diff(np.r_[starts, len(row)])
    best = np.maximum.reduceat(ratio, starts)  # (rows,)
    # numpy's log1p may differ from libm's (torch's) in the last bit: recompute the contenders with libm.
    for i in np.flatnonzero(ratio >= np.repeat(best * (1 - _NEAR_TIE), counts)):
        ratio[i] = values[i] / p.dtype.type(-math.log1p(-float(drawn[i])))
    best = np.maximum.reduceat(ratio, starts)
    winners = np.flatnonzero(ratio == np.repeat(best, counts))
    first = winners[np.r_[True, row[winners][1:] != row[winners][:-1]]]  # argmax keeps the first maximum
    return torch.from_numpy(token[first])


@functools.cache
def _torch_draws_as_replayed() -> bool:
    """Once per process: does this torch build sample as the replay assumes? (A build whose CPU
    exponential_ draws otherwise, e.g. through MKL's streams, keeps torch.multinomial.) It draws from
    generators of its own, so no other generator moves."""
    probe = torch.rand(6, 700, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 4
    probs = probe.masked_fill(probe < 0.3, 0.0).float()  # nucleus-like zeros
    probs = probs / probs.sum(-1, keepdim=True)
    torch_draws, replay_draws = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    expected = torch.multinomial(probs, 1, generator=torch_draws)[:, 0]
    got = _replay(probs, replay_draws)
    return got is not None and torch.equal(got, expected) and torch.equal(replay_draws.get_state(), torch_draws.get_state())

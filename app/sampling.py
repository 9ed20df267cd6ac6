"""Next tokens for a whole batch at once, each row with its own temperature, top-p and random stream.

Nucleus sampling needs the probabilities in descending order, but sorting a (rows, vocab) matrix every
step costs more than the model's own decode step on a CPU. The nucleus almost always lies among the few
hundred likeliest tokens, so each row first looks at its top `CANDIDATES` (one `topk` for the batch) and
falls back to a full sort only when those hold less than top-p of its mass. The sampled distribution is
exactly nucleus sampling either way; the draw is an inverse-CDF lookup of one uniform number from the
row's own generator, so a request's output depends on its seed, not on its neighbours in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CANDIDATES = 1024
MIN_TEMPERATURE = 1e-4  # below it, logits / T overflows float32 (NaN probabilities): such rows are greedy


def _nucleus_pick(sorted_probs: torch.Tensor, top_p: float, uniform: float) -> int:
    """Index into `sorted_probs` (descending, (m,); any order when top_p ≥ 1) of the token that the
    uniform draw selects within the nucleus: the smallest prefix whose mass reaches top_p."""
    cumulative = sorted_probs.cumsum(0)
    # The top token is always in the nucleus, however small top_p is (in float32 a tiny top_p rounds to 0,
    # which would leave the nucleus empty and index -1 pick the last candidate).
    size = len(sorted_probs) if top_p >= 1.0 else max(1, int((cumulative - sorted_probs < top_p).sum()))
    threshold = uniform * float(cumulative[size - 1])
    return min(int(torch.searchsorted(cumulative[:size], torch.tensor([threshold]), right=True)), size - 1)


def sample_next_tokens(
    logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row of `logits` (rows, vocab) float32: argmax where temperature is below
    `MIN_TEMPERATURE` (0 is greedy), else nucleus."""
    rows = logits.shape[0]
    tokens = logits.argmax(-1).tolist()
    sampled = [r for r in range(rows) if temperatures[r] >= MIN_TEMPERATURE]
    if not sampled:
        return tokens
    index = torch.tensor(sampled)
    scale = torch.tensor([temperatures[r] for r in sampled], dtype=logits.dtype)[:, None]
    probs = torch.softmax(logits[index] / scale, dim=-1)  # (s, vocab)
    top_probs, top_ids = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)  # (s, c), descending
    covered = top_probs.sum(-1)  # (s,)
    for j, row in enumerate(sampled):
        uniform = float(torch.rand(1, generator=generators[row]))
        if top_ps[row] >= 1.0:  # the whole vocabulary: no order needed for the inverse CDF
            tokens[row] = _nucleus_pick(probs[j], 1.0, uniform)
        elif float(covered[j]) >= top_ps[row] or top_ids.shape[-1] == probs.shape[-1]:
            tokens[row] = int(top_ids[j, _nucleus_pick(top_probs[j], top_ps[row], uniform)])
        else:  # a flat distribution: the nucleus reaches past the candidates
            full_probs, full_ids = probs[j].sort(descending=True)
            tokens[row] = int(full_ids[_nucleus_pick(full_probs, top_ps[row], uniform)])
    return tokens

"""Fluency: sliding-window perplexity of a text, and teacher-forced log-probabilities of tokens.

Perplexity is the sliding-window method of the Hugging Face guide "Perplexity of fixed-length models".
`token_logprobs` is the cheap, low-noise companion: log-probabilities of given tokens from their lm_head
inputs under W and W' (held-out toxic tokens, or a model's own continuations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import groupby

import torch
from tqdm.auto import tqdm

from eigenshift_core.errors import InputError
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean NLL) over `tokens_scored` tokens, scored in `windows` windows; `bos`: BOS prepended to each.

    window_nll and window_tokens: each window's summed NLL and scored tokens, in text order (the blocks a
    bootstrap interval resamples: tokens within a window are not independent).
    """

    perplexity: float
    nll_per_token: float
    tokens_scored: int
    window: int
    stride: int
    bos: bool
    windows: int
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: the HF guide's loop, where the last `scored` tokens of
    tokens[begin:end] are the window's targets.

    Windows begin every `stride` tokens and end at min(begin + window, n_tokens); each scores the tokens
    past the previous window's end (end − prev_end), so every token is scored once, with the most context
    the window allows. The loop stops at the first window reaching the end. A window's own first token
    has no context, so it is never scored: the first window scores end − 1 tokens, and with
    stride == window every window does (no overlap). Unlike the guide, which weights each window's mean
    loss by (targets − 1), the NLL here is summed token by token, so every scored token counts once.
    """
    spans, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = min(end - previous_end, end - begin - 1)
        if scored > 0:  # a final one-token window (stride == window) has nothing to score
            spans.append((begin, end, scored))
        previous_end = end
        if end == n_tokens:
            break
    return spans


def _check_windows(window: int, stride: int, batch_size: int) -> None:
    if window < 2:
        raise InputError(f"window must be at least 2 tokens, got {window}", field="ppl_window")
    if not 1 <= stride <= window:
        raise InputError(f"stride must be between 1 and window={window}, got {stride}", field="ppl_stride")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")


def _text_ids(lm: LoadedModel, text: str, max_tokens: int | None) -> list[int]:
    if max_tokens is not None and max_tokens < 2:
        raise InputError(f"max_tokens must be at least 2, got {max_tokens}", field="ppl_max_tokens")
    ids = lm.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise InputError(f"the perplexity text has {len(ids)} tokens; at least 2 are needed", field="ppl_text")
    return ids


def _bos_prefix(lm: LoadedModel, bos: bool | None) -> list[int]:
    """[BOS] when asked, or (bos=None) when the tokenizer has a BOS distinct from EOS; else []."""
    bos_id, eos_id = lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id
    if bos is None:
        bos = bos_id is not None and bos_id != eos_id
    if bos and bos_id is None:
        raise InputError("bos=True but the tokenizer has no BOS token", field="ppl_bos")
    return [int(bos_id)] if bos else []


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> float:
    """Σ −log softmax(logits)[target] in float64; logits (n, vocab), targets (n,); chunks bound memory."""
    total = 0.0
    for start in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[start : start + chunk].double(), dim=-1)  # (chunk, vocab)
        total -= float(logp.gather(1, targets[start : start + chunk, None]).sum())
    return total


@torch.inference_mode()
def perplexity(
    lm: LoadedModel, text: str, *, window: int = 1024, stride: int = 512, max_tokens: int | None = None,
    batch_size: int = 4, intervention: Intervention | None = None, bos: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None, progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of `text` (see `sliding_windows` for which tokens each window scores).

    The text is tokenized once without special tokens and cut to `max_tokens`; BOS (when `bos`, or by
    default when the tokenizer has one distinct from EOS) is prepended to every window as context only,
    so the scored tokens never depend on it. Windows of equal shape run as one batch; only the logits of
    scored positions are computed (`logits_to_keep`). With `intervention`, W' replaces W throughout.
    `on_progress(windows done, windows)` is called after every batch.
    """
    _check_windows(window, stride, batch_size)
    ids, prefix = _text_ids(lm, text, max_tokens), _bos_prefix(lm, bos)
    windows = sliding_windows(len(ids), window, stride)
    longest = max(end - begin for begin, end, _ in windows) + len(prefix)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise InputError(f"a window of {longest} positions exceeds the model's {limit}", field="ppl_window")
    nll_of: dict[int, float] = {}  # window number -> summed NLL
    done, device = 0, lm.model.device
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    with bar, intervention.applied(lm.model) if intervention is not None else nullcontext():
        numbered = list(enumerate(windows))
        for (_, scored), group in groupby(numbered, key=lambda w: (w[1][1] - w[1][0], w[1][2])):
            rows = list(group)
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                batch = torch.tensor([prefix + ids[b:e] for _, (b, e, _) in part], device=device)  # (b, prefix + window)
                # Logits of the positions that predict the last `scored` tokens: (b, scored, vocab).
                logits = lm.model(input_ids=batch, logits_to_keep=scored + 1).logits[:, :-1]
                for row, (number, _) in enumerate(part):
                    nll_of[number] = _nll_sum(logits[row], batch[row, -scored:])
                done += batch.shape[0]
                bar.update(batch.shape[0])
                if on_progress:
                    on_progress(done, len(windows))
    window_nll = tuple(nll_of[number] for number in range(len(windows)))
    window_tokens = tuple(scored for _, _, scored in windows)
    count = sum(window_tokens)
    nll = sum(window_nll) / count
    ppl = math.exp(nll) if nll < 700 else math.inf
    return PerplexityResult(ppl, nll, count, window, stride, bool(prefix), len(windows), window_nll, window_tokens)


def token_logprobs(
    weight: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor, intervention: Intervention | None = None,
    chunk: int = 1024, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(token | state) under W (vocab, d), or under W' with `intervention`: (n,) float64 on CPU.

    states (n, d), tokens (n,). The intervention edits the states (W' h = W·apply(h)), so W is never copied.
    """
    if states.ndim != 2 or tokens.shape != states.shape[:1]:
        shapes = f"{tuple(states.shape)} and {tuple(tokens.shape)}"
        raise InputError(f"states (n, d) and tokens (n,) disagree: {shapes}", field="states")
    w = weight.detach().to(torch.float32)
    out = torch.empty(states.shape[0], dtype=torch.float64)
    for start in range(0, states.shape[0], chunk):
        h = states[start : start + chunk].to(w.device, torch.float32)  # (c, d)
        h = intervention.apply(h) if intervention is not None else h
        logits = (h @ w.T + (bias.to(w) if bias is not None else 0.0)).double()  # (c, vocab)
        picked = tokens[start : start + chunk].to(w.device, torch.long)[:, None]
        out[start : start + chunk] = torch.log_softmax(logits, -1).gather(1, picked).squeeze(1).cpu()
    return out



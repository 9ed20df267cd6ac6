"""Selection criteria: score every direction of the output layer's spectrum for damping.

A criterion is a function (spectrum, states, weight) -> `Selection`: one score per direction (higher =
more toxic-aligned; the top k are damped) and, when the criterion also knows how far to damp each
direction, one α per direction. All criteria here are sign-free: vᵢ and −vᵢ score the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from eigenshift_core.errors import InputError, unknown_name
from eigenshift_core.spectrum import Spectrum
from eigenshift_core.states import StateSet

DEFAULT_CRITERION = "selectivity"  # the only one that lowered toxic tokens at < 5 % perplexity cost (README)


@dataclass(frozen=True)
class Selection:
    """What a criterion found: scores (d,) of every direction, and alphas (d,) when it chooses them."""

    scores: torch.Tensor
    alphas: torch.Tensor | None = None


class SelectionCriterion(Protocol):
    def __call__(self, spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> Selection:
        """Score (d,) of each direction of `spectrum` for damping, and α (d,) if the criterion picks them."""
        ...


CRITERIA: dict[str, SelectionCriterion] = {}
CHOOSES_ALPHAS: set[str] = set()  # criteria whose Selection carries α, so alpha="auto" may use them


def register_criterion(name: str, *, chooses_alphas: bool = False) -> Callable[[SelectionCriterion], SelectionCriterion]:
    def decorator(criterion: SelectionCriterion) -> SelectionCriterion:
        CRITERIA[name] = criterion
        if chooses_alphas:
            CHOOSES_ALPHAS.add(name)
        return criterion

    return decorator


def get_criterion(name: str) -> SelectionCriterion:
    if name not in CRITERIA:
        raise unknown_name("criterion", name, CRITERIA, field="criterion")
    return CRITERIA[name]


def check_auto_alpha(criterion: str) -> None:
    """alpha="auto" takes each α from the criterion: refuse a criterion that does not choose them."""
    get_criterion(criterion)
    if criterion not in CHOOSES_ALPHAS:
        choosers = ", ".join(sorted(CHOOSES_ALPHAS)) or "none"
        raise InputError(f"alpha 'auto' needs a criterion that chooses α ({choosers}); {criterion!r} does not: "
                         "give a number or k numbers", field="alpha")


def signed_delta(spectrum: Spectrum, states: StateSet) -> torch.Tensor:
    """deltaᵢ = mean vᵢᵀh over toxic states − mean over non-toxic states, (d,), under the sign convention."""
    return spectrum.project(states.toxic).mean(0) - spectrum.project(states.nontoxic).mean(0)


@register_criterion("delta")
def delta_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> Selection:
    """The paper's delta with its sign ambiguity removed: |deltaᵢ|, since vᵢ and −vᵢ are the same direction."""
    return Selection(signed_delta(spectrum, states).abs())


def token_logit_contributions(
    spectrum: Spectrum, weight: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Mean over states of U[t,i]·σᵢ·vᵢᵀh = (W vᵢ)[t] · (vᵢᵀ h): direction i's share of each state's own
    token logit, (d,). Sign-free: flipping vᵢ flips both factors."""
    right = spectrum.right_vectors.to(torch.float32)
    total = torch.zeros(right.shape[0], dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(torch.float32)  # (n, d)
        rows = weight[tokens[start : start + chunk].to(weight.device)].to("cpu", torch.float32)  # (n, d)
        total += ((rows @ right.T) * (h @ right.T)).double().sum(0)  # (n, d) -> (d,)
    return total / max(hidden.shape[0], 1)


@register_criterion("logit")
def logit_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> Selection:
    """Each direction's contribution to the toxic tokens' logits, minus its contribution to the logits of
    the tokens non-toxic states produced: damping it lowers toxic tokens more than ordinary ones."""
    toxic = token_logit_contributions(spectrum, weight, states.toxic, states.toxic_tokens)
    ordinary = token_logit_contributions(spectrum, weight, states.nontoxic, states.nontoxic_tokens)
    return Selection(toxic - ordinary)


SELECTIVITY_MAX_NONTOXIC = 6000  # the cost side needs only a curvature estimate: a seeded subset suffices
SELECTIVITY_ETA = 0.12  # per-direction rule: 1 − αᵢ = η aᵢ / bᵢ (tuned on a validation split, rows 3000–3999)


def _taylor_terms(
    weight: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor | None, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means over states of cᵢ (gᵢ[t] − E_p gᵢ) (when tokens are given) and cᵢ² Var_p(gᵢ), both (d,),
    with c = V h (d,), gᵢ = W vᵢ (vocab,), p = softmax(W h)."""
    w = weight.to(torch.float32)
    g = w @ v.T  # (vocab, d)
    first = torch.zeros(v.shape[0], dtype=torch.float64, device=w.device)
    second = torch.zeros_like(first)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(w)  # (n, d)
        p = torch.softmax(h @ w.T, dim=-1)  # (n, vocab)
        c, expected = h @ v.T, p @ g  # (n, d) each
        variance = p @ (g * g) - expected * expected  # (n, d)
        if tokens is not None:
            first += (c * (g[tokens[start : start + chunk].to(w.device)] - expected)).double().sum(0)
        second += (c * c * variance).double().sum(0)
    n = max(hidden.shape[0], 1)
    return (first / n).float().cpu(), (second / n).float().cpu()


def selectivity_terms(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (d,). Damping vᵢ by β = 1 − α moves h to h − β cᵢ vᵢ, and to second order
        Δ log p(t|h) ≈ −β cᵢ (gᵢ[t] − E_p gᵢ) − β²/2 · cᵢ² Var_p(gᵢ).
    a = mean of the linear term's factor over toxic states: what damping takes from toxic tokens;
    b = mean curvature over non-toxic states: what it costs ordinary text. (The non-toxic linear term is
    left out: near zero for a trained head, and on the reference data it did not carry over to WikiText.)
    Cost O((m + min(q, 6000)) · vocab · d)."""
    v = spectrum.right_vectors.to(weight.device, torch.float32)
    a, _ = _taylor_terms(weight, v, states.toxic, states.toxic_tokens)
    q = states.nontoxic.shape[0]
    keep = torch.randperm(q, generator=torch.Generator().manual_seed(0))[:SELECTIVITY_MAX_NONTOXIC]
    _, b = _taylor_terms(weight, v, states.nontoxic[keep.sort().values], None)
    return a, b.clamp(min=1e-8)


def selective_alphas(a: torch.Tensor, b: torch.Tensor, eta: float = SELECTIVITY_ETA) -> torch.Tensor:
    """αᵢ = 1 − η aᵢ/bᵢ for every direction, (d,), clipped to [−2, 3] (α > 1 amplifies a direction that
    carries ordinary text away from toxic tokens)."""
    return (1.0 - eta * a / b).clamp(-2.0, 3.0).to(torch.float32)


@register_criterion("selectivity", chooses_alphas=True)
def selectivity_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> Selection:
    """aᵢ² / bᵢ: the toxic log-prob a direction's best damping removes per unit of ordinary log-prob lost
    (β = η aᵢ/bᵢ gains η aᵢ²/bᵢ at a cost of η² aᵢ²/(2 bᵢ)), with that damping as α. Sign-free: cᵢ and
    gᵢ flip together."""
    a, b = selectivity_terms(spectrum, states, weight)
    return Selection(a * a / b, selective_alphas(a, b))

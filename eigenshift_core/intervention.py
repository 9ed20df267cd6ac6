"""Step 3, reconstruct: decompose the output layer, select toxic-aligned directions, damp them.

With W = U Σ Vᵀ (vocab × d), damping σᵢ by αᵢ for the chosen i gives
    W' = W (I − Σᵢ (1 − αᵢ) vᵢ vᵢᵀ),
so W' h = W (h − Vₖᵀ ((1 − α) ⊙ Vₖ h)). An `Intervention` is therefore only Vₖ (k × d) and α (k):
applied to the lm_head input by a pre-hook, it never copies or writes W, and so never touches input
embeddings tied to it.

Sign convention: an eigen/singular vector is defined up to sign. Every right-singular vector is
oriented so that its component of largest magnitude is positive. Selection never depends on it
(criteria are sign-free), but stored directions and the signed `delta` are reproducible with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eigenshift_core.errors import InputError, unknown_name
from eigenshift_core.files import atomic_write
from eigenshift_core.loading import lm_head_sha256, lm_head_weight, output_layer
from eigenshift_core.states import StateSet

FORMAT_VERSION = 1
ARTIFACT_TENSORS = "intervention.safetensors"
ARTIFACT_JSON = "intervention.json"
PAPER_ALPHAS = (-2.0, -1.0, -0.5, 0.0, 0.1, 0.5, 0.9)


# ----------------------------------------------------------------------------------------------------------
# Decomposition


@dataclass(frozen=True)
class Spectrum:
    """Singular values (d,) descending and right-singular vectors as rows (d, d): row i is vᵢ (a row of Vᵀ)."""

    singular_values: torch.Tensor
    right_vectors: torch.Tensor

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """vᵢᵀ h for every direction: (n, d) states -> (n, d) projections, column i on vᵢ."""
        return hidden.to(self.right_vectors.dtype) @ self.right_vectors.T


def decompose_lm_head(weight: torch.Tensor, *, method: Literal["gram", "svd"] = "gram", chunk_rows: int = 4096) -> Spectrum:
    """Right-singular vectors and singular values of W (vocab, d) without forming U (vocab, d).

    `gram`: eigh of WᵀW accumulated in float64 over row chunks (d × d, never a float64 copy of W);
    float64 keeps σᵢ² accurate for the small σᵢ too. `svd`: torch.linalg.svd, for checking.
    """
    if weight.ndim != 2:
        raise InputError(f"expected a 2-D lm_head weight, got shape {tuple(weight.shape)}", field="model")
    if method == "svd":
        _, s, vt = torch.linalg.svd(weight.double(), full_matrices=False)
        return _oriented(s, vt)
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        block = weight[start : start + chunk_rows].double()  # (chunk, d)
        gram += block.T @ block
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending; columns are eigenvectors
    order = torch.argsort(eigenvalues, descending=True)
    singular_values = eigenvalues[order].clamp(min=0).sqrt()
    return _oriented(singular_values, eigenvectors[:, order].T)


def _oriented(singular_values: torch.Tensor, right_vectors: torch.Tensor) -> Spectrum:
    """Apply the sign convention: the largest-magnitude component of each vᵢ is positive."""
    pivot = right_vectors.abs().argmax(dim=1, keepdim=True)  # (d, 1)
    signs = torch.sign(right_vectors.gather(1, pivot))
    signs[signs == 0] = 1
    return Spectrum(singular_values.cpu(), (right_vectors * signs).cpu())


# ----------------------------------------------------------------------------------------------------------
# Selection criteria: each scores every direction (higher = more toxic-aligned); all are sign-free.


class SelectionCriterion(Protocol):
    def __call__(self, spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> torch.Tensor:
        """Score (d,) of each direction of `spectrum` for damping; the top k are chosen."""
        ...


CRITERIA: dict[str, SelectionCriterion] = {}


def register_criterion(name: str) -> Callable[[SelectionCriterion], SelectionCriterion]:
    def decorator(criterion: SelectionCriterion) -> SelectionCriterion:
        CRITERIA[name] = criterion
        return criterion

    return decorator


def get_criterion(name: str) -> SelectionCriterion:
    if name not in CRITERIA:
        raise unknown_name("criterion", name, CRITERIA, field="criterion")
    return CRITERIA[name]


def signed_delta(spectrum: Spectrum, states: StateSet) -> torch.Tensor:
    """deltaᵢ = mean vᵢᵀh over toxic states − mean over non-toxic states, (d,), under the sign convention."""
    return spectrum.project(states.toxic).mean(0) - spectrum.project(states.nontoxic).mean(0)


@register_criterion("delta")
def delta_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> torch.Tensor:
    """The paper's delta with its sign ambiguity removed: |deltaᵢ|, since vᵢ and −vᵢ are the same direction."""
    return signed_delta(spectrum, states).abs()


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
def logit_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> torch.Tensor:
    """Each direction's contribution to the toxic tokens' logits, minus its contribution to the logits of
    the tokens non-toxic states produced: damping it lowers toxic tokens more than ordinary ones."""
    toxic = token_logit_contributions(spectrum, weight, states.toxic, states.toxic_tokens)
    ordinary = token_logit_contributions(spectrum, weight, states.nontoxic, states.nontoxic_tokens)
    return toxic - ordinary


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


@register_criterion("selectivity")
def selectivity_criterion(spectrum: Spectrum, states: StateSet, weight: torch.Tensor) -> torch.Tensor:
    """aᵢ² / bᵢ: the toxic log-prob a direction's best damping removes per unit of ordinary log-prob lost
    (β = η aᵢ/bᵢ gains η aᵢ²/bᵢ at a cost of η² aᵢ²/(2 bᵢ)). Sign-free: cᵢ and gᵢ flip together."""
    a, b = selectivity_terms(spectrum, states, weight)
    return a * a / b


def selective_alphas(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, eta: float = SELECTIVITY_ETA) -> torch.Tensor:
    """αᵢ = 1 − η aᵢ/bᵢ for the chosen directions, clipped to [−2, 3] (α > 1 amplifies a direction that
    carries ordinary text away from toxic tokens)."""
    return (1.0 - (eta * a / b)[indices]).clamp(-2.0, 3.0).to(torch.float32)


def resolve_k(d: int, *, k: int | None = None, percentile: float | None = None) -> int:
    """k given directly, or as the paper's percentile p: k = ceil(d·(1 − p)); 1 ≤ k ≤ d."""
    if (k is None) == (percentile is None):
        raise InputError("give exactly one of k and percentile", field="k")
    if percentile is not None:
        if not (math.isfinite(percentile) and 0.0 <= percentile < 1.0):
            raise InputError(f"percentile must be in [0, 1), got {percentile}", field="percentile")
        k = math.ceil(d * (1.0 - percentile))
    assert k is not None
    if not 1 <= k <= d:
        raise InputError(f"k must be between 1 and d={d}, got {k}", field="k")
    return k


def resolve_alphas(alpha: float | Sequence[float], k: int) -> torch.Tensor:
    """α as a scalar for all k directions or one per direction; finite values only."""
    if isinstance(alpha, str):
        raise InputError(f"alpha must be a number, a list of k numbers or 'auto', got {alpha!r}", field="alpha")
    values = [float(alpha)] * k if isinstance(alpha, int | float) else [float(a) for a in alpha]
    if len(values) != k:
        raise InputError(f"alpha has {len(values)} values but k={k}", field="alpha")
    if not all(math.isfinite(a) for a in values):
        raise InputError("alpha must be finite (no NaN or infinity)", field="alpha")
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# The intervention


@dataclass(frozen=True)
class Intervention:
    """k directions of the output layer and how much to keep of each: h ← h − Vₖᵀ((1 − α) ⊙ Vₖ h).

    directions (k, d) float32 orthonormal rows vᵢ; alphas (k,); singular_values (k,) σᵢ of W;
    indices (k,) rank of each direction in the descending spectrum; delta (d,) signed delta of every
    direction; scores (d,) the criterion's score of every direction; info: provenance (JSON-able).
    """

    directions: torch.Tensor
    alphas: torch.Tensor
    singular_values: torch.Tensor
    indices: torch.Tensor
    delta: torch.Tensor
    scores: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    def apply(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Edited lm_head input, same shape and dtype as `hidden` (batch, ..., d).

        rows: optional (batch,) bool mask; rows where it is False pass through unchanged, so one batch
        can mix detox on and off.
        """
        v = self.directions.to(hidden.device, torch.float32)  # (k, d)
        keep = (1.0 - self.alphas).to(hidden.device, torch.float32)  # (k,)
        h = hidden.to(torch.float32)
        edited = (h - ((h @ v.T) * keep) @ v).to(hidden.dtype)  # (..., k) -> (..., d)
        if rows is None:
            return edited
        mask = rows.to(hidden.device, torch.bool).reshape(-1, *([1] * (hidden.ndim - 1)))
        return torch.where(mask, edited, hidden)

    @contextmanager
    def applied(self, model: nn.Module, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Edit every lm_head input of `model` inside the block; the hook is removed on exit, also on error."""
        head = output_layer(model)  # type: ignore[arg-type]
        if head.in_features != self.d_model:
            raise InputError(f"intervention has d={self.d_model} but the model's lm_head takes {head.in_features}")

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (self.apply(args[0], rows), *args[1:])

        handle = head.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def materialize(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = W − (W Vₖᵀ diag(1 − α)) Vₖ as a new float32 tensor (vocab, d); W is not modified."""
        w = weight.detach().to(torch.float32)
        v = self.directions.to(w.device, torch.float32)
        return w - ((w @ v.T) * (1.0 - self.alphas).to(w.device)) @ v

    def with_alphas(self, alpha: float | Sequence[float]) -> Intervention:
        """The same directions with other α (for sweeps); provenance keeps the new α."""
        alphas = resolve_alphas(alpha, self.k)
        return Intervention(
            self.directions, alphas, self.singular_values, self.indices, self.delta, self.scores,
            {**self.info, "alpha": alphas.tolist()},
        )

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose lm_head differs (shape or bytes) from the one this was built on."""
        weight = lm_head_weight(model)  # type: ignore[arg-type]
        shape = list(self.info.get("lm_head_shape", []))
        if shape and list(weight.shape) != shape:
            raise InputError(f"intervention was built for an lm_head of shape {shape}, this model has {list(weight.shape)}", field="intervention")
        expected = self.info.get("lm_head_sha256")
        if expected and lm_head_sha256(model) != expected:  # type: ignore[arg-type]
            raise InputError(
                f"intervention was built for another lm_head (model {self.info.get('model_id')!r}, sha256 {expected[:12]}…)",
                field="intervention",
            )

    # -- artifact ------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write `intervention.safetensors` and `intervention.json` into `directory`; each file appears atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "directions": self.directions.to(torch.float32).contiguous(),
            "alphas": self.alphas.to(torch.float32).contiguous(),
            "singular_values": self.singular_values.to(torch.float32).contiguous(),
            "indices": self.indices.to(torch.int64).contiguous(),
            "delta": self.delta.to(torch.float32).contiguous(),
            "scores": self.scores.to(torch.float32).contiguous(),
        }
        atomic_write(directory / ARTIFACT_TENSORS, lambda p: save_file(tensors, str(p)))
        meta = {"format_version": FORMAT_VERSION, **self.info, "k": self.k, "alpha": self.alphas.tolist()}
        atomic_write(directory / ARTIFACT_JSON, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @staticmethod
    def load(directory: Path, model: nn.Module | None = None) -> Intervention:
        """Read an artifact directory; with `model`, refuse it unless its lm_head matches."""
        directory = Path(directory)
        tensors_path, json_path = directory / ARTIFACT_TENSORS, directory / ARTIFACT_JSON
        if not tensors_path.is_file() or not json_path.is_file():
            raise InputError(f"no intervention artifact in {directory} (needs {ARTIFACT_TENSORS} and {ARTIFACT_JSON})", field="intervention")
        try:
            info = json.loads(json_path.read_text())
            t = load_file(str(tensors_path))
            intervention = Intervention(
                t["directions"], t["alphas"], t["singular_values"], t["indices"], t["delta"], t["scores"], info
            )
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            raise InputError(f"corrupt intervention artifact in {directory}: {error}", field="intervention") from None
        if info.get("format_version") != FORMAT_VERSION:
            raise InputError(f"unsupported intervention format {info.get('format_version')!r}", field="intervention")
        if intervention.directions.ndim != 2 or intervention.alphas.shape != (intervention.k,):
            raise InputError("corrupt intervention artifact: directions and alphas disagree", field="intervention")
        if model is not None:
            intervention.check_model(model)
        return intervention


def build_intervention(
    model: nn.Module,
    states: StateSet,
    *,
    criterion: str = "delta",
    k: int | None = None,
    percentile: float | None = None,
    alpha: float | Sequence[float] | Literal["auto"] = 0.5,
    spectrum: Spectrum | None = None,
    info: dict[str, Any] | None = None,
) -> Intervention:
    """Decompose the model's lm_head, score every direction with `criterion`, keep the top k, damp by α.

    alpha="auto" sets each αᵢ from the second-order selectivity terms (`selective_alphas`).
    """
    select = get_criterion(criterion)
    weight = lm_head_weight(model)  # type: ignore[arg-type]
    d = weight.shape[1]
    k = resolve_k(d, k=k, percentile=percentile)
    alphas = None if alpha == "auto" else resolve_alphas(alpha, k)
    states.require_both()
    if states.d_model != d:
        raise InputError(f"states have d={states.d_model} but the model's lm_head takes {d}", field="states")
    spectrum = spectrum or decompose_lm_head(weight)
    # The selectivity terms serve both the criterion and α="auto": compute them once.
    terms = selectivity_terms(spectrum, states, weight) if alphas is None or criterion == "selectivity" else None
    scores = (terms[0] ** 2 / terms[1] if terms and criterion == "selectivity" else select(spectrum, states, weight))
    scores = scores.to(torch.float32)  # (d,)
    indices = torch.argsort(scores, descending=True, stable=True)[:k]
    if alphas is None:
        assert terms is not None
        alphas = selective_alphas(*terms, indices)
    from eigenshift_core import __version__

    provenance = {
        "model_id": getattr(getattr(model, "config", None), "_name_or_path", None),
        "lm_head_shape": list(weight.shape),
        "lm_head_sha256": lm_head_sha256(model),  # type: ignore[arg-type]
        "criterion": criterion,
        "state_counts": states.counts(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        **(info or {}),
    }
    return Intervention(
        directions=spectrum.right_vectors[indices].to(torch.float32),
        alphas=alphas,
        singular_values=spectrum.singular_values[indices].to(torch.float32),
        indices=indices,
        delta=signed_delta(spectrum, states).to(torch.float32),
        scores=scores,
        info=provenance,
    )

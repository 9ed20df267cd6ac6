"""Step 3, reconstruct: the intervention, its artifact, and how it is built from states.

With W = U Σ Vᵀ (vocab × d), damping σᵢ by αᵢ for the chosen i gives
    W' = W (I − Σᵢ (1 − αᵢ) vᵢ vᵢᵀ),
so W' h = W (h − Vₖᵀ ((1 − α) ⊙ Vₖ h)). An `Intervention` is therefore only Vₖ (k × d) and α (k):
applied to the lm_head input by a pre-hook, it never copies or writes W, and so never touches input
embeddings tied to it. The spectrum is in `spectrum.py`, the selection criteria in `criteria.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eigenshift_core import __version__
from eigenshift_core.criteria import DEFAULT_CRITERION, check_auto_alpha, get_criterion, signed_delta
from eigenshift_core.errors import InputError
from eigenshift_core.files import atomic_write
from eigenshift_core.loading import lm_head_sha256, lm_head_weight, output_layer
from eigenshift_core.spectrum import Spectrum, decompose_lm_head
from eigenshift_core.states import StateSet

FORMAT_VERSION = 1
ARTIFACT_TENSORS = "intervention.safetensors"
ARTIFACT_JSON = "intervention.json"
PAPER_ALPHAS = (-2.0, -1.0, -0.5, 0.0, 0.1, 0.5, 0.9)
DEFAULT_K = 100  # directions damped when neither k nor percentile is given (capped at d): the default's k
Alpha = float | Sequence[float] | str  # or "auto": the criterion's own α


def resolve_k(d: int, *, k: int | None = None, percentile: float | None = None) -> int:
    """k given directly, or as the paper's percentile p: k = ceil(d·(1 − p)), or min(DEFAULT_K, d) when
    neither is given; 1 ≤ k ≤ d."""
    if k is not None and percentile is not None:
        raise InputError("give k or percentile, not both", field="k")
    if k is None and percentile is None:
        return min(DEFAULT_K, d)
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

    def check_model(self, model: nn.Module, head_sha256: str | None = None) -> None:
        """Refuse a model whose lm_head differs (shape or bytes) from the one this was built on.
        head_sha256: the model's `lm_head_sha256`, when the caller keeps it (hashing the head takes a while)."""
        weight = lm_head_weight(model)  # type: ignore[arg-type]
        shape = list(self.info.get("lm_head_shape", []))
        if shape and list(weight.shape) != shape:
            raise InputError(f"intervention was built for an lm_head of shape {shape}, this model has {list(weight.shape)}", field="intervention")
        expected = self.info.get("lm_head_sha256")
        if expected and (head_sha256 or lm_head_sha256(model)) != expected:  # type: ignore[arg-type]
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
            if isinstance(info, dict) and info.get("kind", "eigenshift") != "eigenshift":
                raise InputError(f"{directory} holds an intervention of kind {info['kind']!r}, not EigenShift's: "
                                 "read it with eigenshift_core.families.load_any", field="intervention")
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
        _check_values(intervention, directory)
        if model is not None:
            intervention.check_model(model)
        return intervention


ORTHONORMAL_TOLERANCE = 1e-3  # max |V Vᵀ − I|; float32 SVD rows are within ~1e-6


def _check_values(intervention: Intervention, directory: Path) -> None:
    """Refuse an artifact whose tensors are not finite or whose directions are not orthonormal rows: such
    an edit would not be a projection, and would serve garbage (NaN logits, a rescaled vocabulary)."""
    tensors = {"directions": intervention.directions, "alphas": intervention.alphas,
               "singular_values": intervention.singular_values, "delta": intervention.delta,
               "scores": intervention.scores}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise InputError(f"corrupt intervention artifact in {directory}: {name} holds non-finite values",
                             field="intervention")
    v = intervention.directions.to(torch.float64)  # (k, d)
    if v.shape[0] > v.shape[1]:
        raise InputError(f"corrupt intervention artifact in {directory}: k={v.shape[0]} directions in "
                         f"d={v.shape[1]}", field="intervention")
    error = float((v @ v.T - torch.eye(v.shape[0], dtype=torch.float64)).abs().max())  # (k, k)
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(f"corrupt intervention artifact in {directory}: directions are not orthonormal "
                         f"(max |V Vᵀ − I| = {error:.3g} > {ORTHONORMAL_TOLERANCE})", field="intervention")


def check_alpha(alpha: Alpha, *, criterion: str, k: int | None) -> None:
    """What can be known of α before any state is read: 'auto' needs a criterion that chooses α, and a
    list needs k values (when k is known)."""
    if isinstance(alpha, str):
        if alpha != "auto":
            raise InputError(f"alpha must be a number, a list of k numbers or 'auto', got {alpha!r}", field="alpha")
        check_auto_alpha(criterion)
    elif k is not None:
        resolve_alphas(alpha, k)


def build_intervention(
    model: nn.Module,
    states: StateSet,
    *,
    criterion: str = DEFAULT_CRITERION,
    k: int | None = None,
    percentile: float | None = None,
    alpha: Alpha = "auto",
    spectrum: Spectrum | None = None,
    info: dict[str, Any] | None = None,
) -> Intervention:
    """Decompose the model's lm_head, score every direction with `criterion`, keep the top k, damp by α.

    alpha="auto" takes each chosen direction's α from the criterion's `Selection` (selectivity chooses them).
    """
    select = get_criterion(criterion)
    weight = lm_head_weight(model)  # type: ignore[arg-type]
    d = weight.shape[1]
    k = resolve_k(d, k=k, percentile=percentile)
    check_alpha(alpha, criterion=criterion, k=k)
    states.require_both()
    if states.d_model != d:
        raise InputError(f"states have d={states.d_model} but the model's lm_head takes {d}", field="states")
    spectrum = spectrum or decompose_lm_head(weight)
    selection = select(spectrum, states, weight)
    scores = selection.scores.to(torch.float32)  # (d,)
    indices = torch.argsort(scores, descending=True, stable=True)[:k]
    if alpha == "auto":
        assert selection.alphas is not None  # check_alpha refused a criterion without α
        alphas = selection.alphas[indices].to(torch.float32)
    else:
        alphas = resolve_alphas(alpha, k)  # type: ignore[arg-type]
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

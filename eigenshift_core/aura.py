"""AURA (Suau et al., ICML 2024, "Whispering Experts"): damp each MLP neuron by how well it tells toxic text
from non-toxic text.

A neuron's expertise is the AUROC of its pooled activation (max or mean over a sentence's tokens) as a
toxic-vs-non-toxic classifier. Its gain is αᵢ = 1 − Giniᵢ = 1 − 2·(AUROCᵢ − 0.5) when AUROCᵢ > 0.5, else 1:
neurons that do not fire for toxicity are untouched, perfect experts are silenced. The neurons are the
MLP's intermediate activations, i.e. the input of each layer's down projection (`mlp.down_proj` for
LLaMA-like models, `mlp.c_proj` for GPT-2), and the gains are applied by forward pre-hooks on them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eigenshift_core import __version__
from eigenshift_core.errors import InputError
from eigenshift_core.files import atomic_write
from eigenshift_core.loading import LoadedModel
from eigenshift_core.prompts import load_prompts

AURA_KIND = "aura"
FORMAT_VERSION = 1
ARTIFACT_TENSORS = "intervention.safetensors"  # the same names as `Intervention`: one artifact layout
ARTIFACT_JSON = "intervention.json"
Pooling = Literal["max", "mean"]
POOLINGS: tuple[Pooling, ...] = ("max", "mean")
MLP_LAYOUTS = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}  # layout: suffix of the down projection's name


# ----------------------------------------------------------------------------------------------------------
# The math: AUROC per neuron, and the gains


def auroc(positive: torch.Tensor, negative: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """AUROC of every column as a score separating `positive` (p, N) rows from `negative` (q, N) rows: (N,) float64.

    Rank-based (Mann–Whitney U): AUROC = (Σ ranks of positives − p(p+1)/2) / (p·q), ties given their average
    rank, so a tie between a positive and a negative counts one half. Columns run `chunk` at a time.
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise InputError(f"auroc needs (p, N) and (q, N) scores, got {tuple(positive.shape)} and {tuple(negative.shape)}")
    p, q = positive.shape[0], negative.shape[0]
    if p == 0 or q == 0:
        raise InputError(f"auroc needs examples of both classes, got {p} positive and {q} negative", field="texts")
    values = torch.cat([positive, negative]).to(torch.float64)  # (p + q, N)
    if not bool(torch.isfinite(values).all()):
        raise InputError("auroc needs finite scores", field="texts")
    out = []
    for start in range(0, values.shape[1], chunk):
        v = values[:, start : start + chunk].T.contiguous()  # (c, p + q)
        s = v.sort(dim=1).values
        below = torch.searchsorted(s, v, side="left")  # values strictly smaller
        upto = torch.searchsorted(s, v, side="right")  # values smaller or equal
        ranks = (below + upto + 1).to(torch.float64) / 2  # 1-based average rank of each tie group
        out.append((ranks[:, :p].sum(1) - p * (p + 1) / 2) / (p * q))
    return torch.cat(out)


def aura_gains(scores: torch.Tensor) -> torch.Tensor:
    """αᵢ = 1 − 2·(AUROCᵢ − 0.5) where AUROCᵢ > 0.5, else 1; same shape as `scores`, float32 in [0, 1]."""
    gini = 2.0 * (scores.to(torch.float64) - 0.5)
    return torch.where(scores > 0.5, 1.0 - gini, torch.ones_like(gini)).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Where the neurons are


def mlp_layout(model: nn.Module) -> str:
    """'llama' (mlp.down_proj) or 'gpt2' (mlp.c_proj); InputError for a model with neither."""
    names = [name for name, _ in model.named_modules()]
    for layout, suffix in MLP_LAYOUTS.items():
        if any(name.endswith("." + suffix) for name in names):
            return layout
    raise InputError(f"{type(model).__name__} has no MLP down projection AURA knows "
                     f"({', '.join(MLP_LAYOUTS.values())})", field="model")


def down_projections(model: nn.Module) -> list[nn.Module]:
    """Each layer's MLP down projection, in layer order; its input is the layer's (…, neurons) activations."""
    suffix = "." + MLP_LAYOUTS[mlp_layout(model)]
    return [module for name, module in model.named_modules() if name.endswith(suffix)]


def neuron_count(projection: nn.Module) -> int:
    """Input width of a down projection: nn.Linear (out, in) or GPT-2's Conv1D (in, out)."""
    if isinstance(projection, nn.Linear):
        return int(projection.in_features)
    return int(projection.weight.shape[0])  # type: ignore[index, union-attr]


def mlp_shape(model: nn.Module) -> list[int]:
    """[layers, neurons] of the model's MLPs; refuses layers of different widths."""
    widths = {neuron_count(p) for p in down_projections(model)}
    if len(widths) != 1:
        raise InputError(f"MLP layers of different widths {sorted(widths)}: AURA needs one width", field="model")
    return [len(down_projections(model)), widths.pop()]


# ----------------------------------------------------------------------------------------------------------
# The intervention


@dataclass(frozen=True)
class AuraIntervention:
    """A gain per MLP neuron: layer l's down projection sees a ⊙ gains[l] instead of a.

    gains (layers, neurons) float32 in [0, 1]; auroc (layers, neurons) float32, each neuron's expertise;
    info: provenance (JSON-able).
    """

    gains: torch.Tensor
    auroc: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = AURA_KIND

    @property
    def k(self) -> int:
        """Neurons damped (gain below 1): the size comparable to EigenShift's k."""
        return int((self.gains < 1.0).sum())

    @property
    def shape(self) -> list[int]:
        return [int(n) for n in self.gains.shape]

    def apply(self, activations: torch.Tensor, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer `layer`'s damped activations, same shape and dtype as `activations` (batch, ..., neurons).

        rows: optional (batch,) bool mask; rows where it is False pass through unchanged."""
        gains = self.gains[layer].to(activations.device, activations.dtype)  # (neurons,)
        damped = activations * gains
        if rows is None:
            return damped
        mask = rows.to(activations.device, torch.bool).reshape(-1, *([1] * (activations.ndim - 1)))
        return torch.where(mask, damped, activations)

    @contextmanager
    def applied(self, model: nn.Module, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Damp every down projection's input of `model` inside the block; hooks removed on exit, also on error."""
        projections = down_projections(model)
        if mlp_shape(model) != self.shape:
            raise InputError(f"AURA gains are {self.shape} (layers, neurons) but the model's MLPs are "
                             f"{mlp_shape(model)}", field="intervention")
        handles = []
        try:
            for layer, projection in enumerate(projections):
                def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], layer: int = layer) -> tuple[torch.Tensor, ...]:
                    return (self.apply(args[0], layer, rows), *args[1:])

                handles.append(projection.register_forward_pre_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose MLPs have another shape than the one this was built on."""
        if mlp_shape(model) != self.shape:
            raise InputError(f"AURA intervention was built for MLPs of shape {self.shape} (model "
                             f"{self.info.get('model_id')!r}), this model has {mlp_shape(model)}", field="intervention")

    # -- artifact ------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write `intervention.safetensors` (gains, auroc) and `intervention.json` (kind "aura") into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"gains": self.gains.to(torch.float32).contiguous(), "auroc": self.auroc.to(torch.float32).contiguous()}
        atomic_write(directory / ARTIFACT_TENSORS, lambda p: save_file(tensors, str(p)))
        meta = {"format_version": FORMAT_VERSION, **self.info, "kind": AURA_KIND, "mlp_shape": self.shape, "k": self.k}
        atomic_write(directory / ARTIFACT_JSON, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @staticmethod
    def load(directory: Path, model: nn.Module | None = None) -> AuraIntervention:
        """Read an AURA artifact directory; with `model`, refuse it unless its MLPs have the recorded shape."""
        directory = Path(directory)
        tensors_path, json_path = directory / ARTIFACT_TENSORS, directory / ARTIFACT_JSON
        if not tensors_path.is_file() or not json_path.is_file():
            raise InputError(f"no intervention artifact in {directory} (needs {ARTIFACT_TENSORS} and {ARTIFACT_JSON})",
                             field="intervention")
        try:
            info = json.loads(json_path.read_text())
            t = load_file(str(tensors_path))
            aura = AuraIntervention(t["gains"], t["auroc"], info)
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            raise InputError(f"corrupt intervention artifact in {directory}: {error}", field="intervention") from None
        if info.get("kind") != AURA_KIND or info.get("format_version") != FORMAT_VERSION:
            raise InputError(f"not an AURA artifact (kind {info.get('kind')!r}, format {info.get('format_version')!r})",
                             field="intervention")
        _check_values(aura, directory)
        if model is not None:
            aura.check_model(model)
        return aura


def _check_values(aura: AuraIntervention, directory: Path) -> None:
    """Refuse gains that are not finite, outside [0, 1], or not of the recorded (layers, neurons) shape."""
    for name, tensor in (("gains", aura.gains), ("auroc", aura.auroc)):
        if tensor.ndim != 2 or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise InputError(f"corrupt intervention artifact in {directory}: {name} is not a finite "
                             "(layers, neurons) tensor", field="intervention")
    if aura.auroc.shape != aura.gains.shape or aura.info.get("mlp_shape", aura.shape) != aura.shape:
        raise InputError(f"corrupt intervention artifact in {directory}: gains, auroc and mlp_shape disagree",
                         field="intervention")
    if bool((aura.gains < 0).any() or (aura.gains > 1).any()):
        raise InputError(f"corrupt intervention artifact in {directory}: gains outside [0, 1]", field="intervention")


# ----------------------------------------------------------------------------------------------------------
# Building it


@contextmanager
def captured_pooled_activations(model: nn.Module, mask: list[torch.Tensor], pooling: Pooling) -> Iterator[list[torch.Tensor]]:
    """Per layer, the pooled down-projection input of each forward inside the block: (batch, neurons) float32 on CPU.

    mask holds the current batch's (batch, positions) attention mask as its one element (set before each
    forward), so padding never enters a max or a mean."""
    pooled: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        a = args[0].to(torch.float32)  # (batch, positions, neurons)
        keep = mask[0].to(a.device, torch.bool)[:, :, None]  # (batch, positions, 1)
        if pooling == "max":
            value = a.masked_fill(~keep, float("-inf")).amax(dim=1)
        else:
            value = (a * keep).sum(1) / keep.sum(1).clamp(min=1)
        pooled.append(value.cpu())

    handles = [p.register_forward_pre_hook(hook) for p in down_projections(model)]
    try:
        yield pooled
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def pooled_activations(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 32, pooling: Pooling = "max",
                       max_tokens: int = 64) -> torch.Tensor:
    """Each text's pooled MLP activations, (texts, layers, neurons) float32, over its first `max_tokens` tokens."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}", field="pooling")
    if batch_size < 1 or max_tokens < 1:
        raise InputError("batch_size and max_tokens must be at least 1", field="batch_size")
    texts = [t if t.strip() else " " for t in texts]  # an empty text still gets one token
    mask: list[torch.Tensor] = [torch.empty(0)]
    out = []
    body = getattr(lm.model, "base_model", lm.model)  # the transformer without lm_head: logits are not needed
    with captured_pooled_activations(lm.model, mask, pooling) as pooled:
        for start in range(0, len(texts), batch_size):
            batch = lm.tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=max_tokens, add_special_tokens=False)
            batch = {key: value.to(lm.model.device) for key, value in batch.items()}
            mask[0] = batch["attention_mask"]
            pooled.clear()
            body(**batch)
            out.append(torch.stack(pooled, dim=1))  # (batch, layers, neurons)
    return torch.cat(out)


def build_aura(lm: LoadedModel, toxic_texts: Sequence[str], nontoxic_texts: Sequence[str], *, batch_size: int = 32,
               pooling: Pooling = "max", max_tokens: int = 64, info: dict[str, Any] | None = None) -> AuraIntervention:
    """AURA gains from the model's own activations on toxic and non-toxic texts (both needed)."""
    if not toxic_texts or not nontoxic_texts:
        raise InputError(f"AURA needs toxic and non-toxic texts, got {len(toxic_texts)} and {len(nontoxic_texts)}",
                         field="texts")
    layers, neurons = mlp_shape(lm.model)
    options = {"batch_size": batch_size, "pooling": pooling, "max_tokens": max_tokens}
    toxic = pooled_activations(lm, toxic_texts, **options).reshape(len(toxic_texts), -1)  # type: ignore[arg-type]
    nontoxic = pooled_activations(lm, nontoxic_texts, **options).reshape(len(nontoxic_texts), -1)  # type: ignore[arg-type]
    scores = auroc(toxic, nontoxic).reshape(layers, neurons)
    provenance = {
        "kind": AURA_KIND,
        "model_id": lm.model_id,
        "layout": mlp_layout(lm.model),
        "layers": layers,
        "neurons": neurons,
        "pooling": pooling,
        "max_tokens": max_tokens,
        "text_counts": {"toxic": len(toxic_texts), "nontoxic": len(nontoxic_texts)},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        **(info or {}),
    }
    return AuraIntervention(aura_gains(scores), scores.to(torch.float32), provenance)


def reference_texts(path: Path, rows: str | None = "0:4000") -> tuple[list[str], list[str]]:
    """(toxic, non-toxic) generations of a step-2 CSV's rows: label yes, and label no."""
    chosen = load_prompts(path, rows)
    missing = {"generation", "label"} - set(chosen.records[0])
    if missing:
        raise InputError(f"{path} is not a step-2 CSV: missing columns {sorted(missing)}", field="aura_reference_csv")
    toxic = [r["generation"] for r in chosen.records if r["label"].strip().lower() == "yes"]
    nontoxic = [r["generation"] for r in chosen.records if r["label"].strip().lower() == "no"]
    return toxic, nontoxic


def build_aura_from_reference_csv(lm: LoadedModel, path: Path, *, rows: str | None = "0:4000", batch_size: int = 32,
                                  pooling: Pooling = "max", max_tokens: int = 64) -> AuraIntervention:
    """AURA built on a step-2 CSV: toxic texts are the generations labelled yes, non-toxic those labelled no."""
    toxic, nontoxic = reference_texts(path, rows)
    return build_aura(lm, toxic, nontoxic, batch_size=batch_size, pooling=pooling, max_tokens=max_tokens,
                      info={"source": str(path), "rows": rows})

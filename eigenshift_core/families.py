"""Intervention families: what every detox edit offers, and the registry that loads any artifact by its kind.

An artifact directory holds `intervention.safetensors` and `intervention.json`; the json's `kind` names the
family ("aura", ...). EigenShift's artifacts predate the field, so a missing `kind` means "eigenshift".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from eigenshift_core.aura import AURA_KIND, AuraIntervention
from eigenshift_core.errors import InputError, unknown_name
from eigenshift_core.intervention import ARTIFACT_JSON, Intervention

DEFAULT_KIND = "eigenshift"


class DetoxIntervention(Protocol):
    """What generation, perplexity and comparison need of an intervention."""

    @property
    def info(self) -> dict[str, Any]: ...

    @property
    def k(self) -> int: ...

    def applied(self, model: nn.Module, rows: torch.Tensor | None = None) -> AbstractContextManager[None]: ...

    def save(self, directory: Path) -> Path: ...


Loader = Callable[[Path, "nn.Module | None"], DetoxIntervention]
FAMILIES: dict[str, Loader] = {}


def register_family(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: `loader(directory, model)` reads artifacts whose json says `kind`."""

    def register(loader: Loader) -> Loader:
        FAMILIES[kind] = loader
        return loader

    return register


@register_family(DEFAULT_KIND)
def _load_eigenshift(directory: Path, model: nn.Module | None) -> DetoxIntervention:
    return Intervention.load(directory, model)


@register_family(AURA_KIND)
def _load_aura(directory: Path, model: nn.Module | None) -> DetoxIntervention:
    return AuraIntervention.load(directory, model)


def kind_of(directory: Path) -> str:
    """The family of the artifact in `directory`: its json's `kind`, or "eigenshift" when absent."""
    path = Path(directory) / ARTIFACT_JSON
    if not path.is_file():
        raise InputError(f"no intervention artifact in {directory} (needs {ARTIFACT_JSON})", field="intervention")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"corrupt intervention artifact in {directory}: {error}", field="intervention") from None
    kind = meta.get("kind", DEFAULT_KIND) if isinstance(meta, dict) else None
    if not isinstance(kind, str):
        raise InputError(f"corrupt intervention artifact in {directory}: kind is {kind!r}", field="intervention")
    return kind


def family_of(intervention: object) -> str:
    """The kind of a loaded intervention (EigenShift's class carries none: it is the default)."""
    return str(getattr(intervention, "kind", DEFAULT_KIND))


def load_any(directory: Path, model: nn.Module | None = None) -> DetoxIntervention:
    """Load the artifact in `directory` with its family's loader; with `model`, each family checks it fits."""
    kind = kind_of(directory)
    if kind not in FAMILIES:
        raise unknown_name("intervention kind", kind, FAMILIES, field="intervention")
    return FAMILIES[kind](Path(directory), model)


def known_families() -> Iterator[str]:
    return iter(sorted(FAMILIES))

"""Hidden states collected for EigenShift: toxic and non-toxic lm_head inputs and the tokens they produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from eigenshift_core.errors import InputError
from eigenshift_core.files import atomic_write


@dataclass(frozen=True)
class StateSet:
    """lm_head inputs that produced toxic tokens, and inputs from non-toxic text, with their next tokens.

    toxic: (m, d) float32; toxic_tokens: (m,) the token each toxic state produced;
    nontoxic: (q, d) float32; nontoxic_tokens: (q,).
    """

    toxic: torch.Tensor
    toxic_tokens: torch.Tensor
    nontoxic: torch.Tensor
    nontoxic_tokens: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.toxic.shape[-1] if self.toxic.numel() else self.nontoxic.shape[-1])

    def counts(self) -> dict[str, int]:
        return {"toxic": int(self.toxic.shape[0]), "nontoxic": int(self.nontoxic.shape[0])}

    def require_both(self) -> StateSet:
        """Raise a clear error when either side is empty: nothing can be compared then."""
        if self.toxic.shape[0] == 0:
            raise InputError("no toxic states found: no toxic word could be located in any continuation", field="prompts")
        if self.nontoxic.shape[0] == 0:
            raise InputError("no non-toxic states found: every continuation was judged toxic", field="prompts")
        return self

    @staticmethod
    def concat(parts: list[StateSet]) -> StateSet:
        if not parts:
            raise InputError("no states to concatenate", field="prompts")
        return StateSet(
            toxic=torch.cat([p.toxic for p in parts]),
            toxic_tokens=torch.cat([p.toxic_tokens for p in parts]),
            nontoxic=torch.cat([p.nontoxic for p in parts]),
            nontoxic_tokens=torch.cat([p.nontoxic_tokens for p in parts]),
            info=parts[0].info,
        )

    def save(self, path: Path) -> None:
        tensors = {
            "toxic": self.toxic.contiguous(),
            "toxic_tokens": self.toxic_tokens.contiguous(),
            "nontoxic": self.nontoxic.contiguous(),
            "nontoxic_tokens": self.nontoxic_tokens.contiguous(),
        }
        metadata = {k: str(v) for k, v in self.info.items()}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @staticmethod
    def load(path: Path) -> StateSet:
        if not Path(path).is_file():
            raise InputError(f"states file not found: {path}", field="states")
        try:
            t = load_file(str(path))
            return StateSet(t["toxic"], t["toxic_tokens"], t["nontoxic"], t["nontoxic_tokens"])
        except (KeyError, OSError, RuntimeError, ValueError) as error:  # safetensors raises its own errors as these
            raise InputError(f"cannot read states from {path}: {error}", field="states") from None

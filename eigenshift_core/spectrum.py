"""The output layer's spectrum: right-singular vectors and singular values of W (vocab × d), never U.

Sign convention: an eigen/singular vector is defined up to sign. Every right-singular vector is oriented
so that its component of largest magnitude is positive. Selection never depends on it (criteria are
sign-free), but stored directions and the signed `delta` are reproducible with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from eigenshift_core.errors import InputError


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

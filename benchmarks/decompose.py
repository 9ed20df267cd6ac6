"""Benchmark: our lm_head decomposition (float64 Gram + eigh) against numpy's SVD of the same matrix.

W (vocab, d) float32 has a decaying, power-law spectrum: Gaussian rows scaled column-wise by
(1 + j)^(-1/2), then rotated by a random orthogonal d × d matrix so that no direction is axis-aligned.
The rotation is a Kronecker product of two small Haar rotations (d = a·b), which is still orthogonal
and dense but costs O(vocab·d·(a + b)) to apply instead of O(vocab·d²): a LLaMA-2-sized head is built
in seconds, one row block at a time, with a single full copy in memory.

ratio = numpy seconds / ours; also the top-k right-singular vectors of both must agree (|cos| ≥ 0.999).
"""

from __future__ import annotations

import gc
import math

import numpy as np
import torch

from benchmarks._common import emit, log, parse_args, timed
from eigenshift_core.intervention import decompose_lm_head

NAME = "decompose"
TARGET = ">=4"
MIN_ABS_COS = 0.999
FULL_SHAPE = (32000, 4096)  # LLaMA-2-7B's lm_head
QUICK_SHAPE = (8000, 1024)


def haar_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (n, n): QR of a Gaussian with the signs of R's diagonal moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def kronecker_factors(d: int) -> tuple[int, int]:
    """d = a·b with a the largest divisor of d not above √d (64·64 for 4096, 24·24 for 576)."""
    a = max(f for f in range(1, math.isqrt(d) + 1) if d % f == 0)
    return a, d // a


def synthetic_head(vocab: int, d: int, *, seed: int = 0, chunk_rows: int = 4096) -> torch.Tensor:
    """W = G · diag(s) · Qᵀ, (vocab, d) float32, G Gaussian, sⱼ = (1 + j)^(-1/2), Q = A ⊗ B orthogonal."""
    generator = torch.Generator().manual_seed(seed)
    a, b = kronecker_factors(d)
    rot_a, rot_b = haar_rotation(a, generator), haar_rotation(b, generator)
    profile = (1.0 + torch.arange(d, dtype=torch.float32)) ** -0.5  # (d,)
    weight = torch.empty(vocab, d)
    for start in range(0, vocab, chunk_rows):
        rows = min(chunk_rows, vocab - start)
        block = (torch.randn(rows, d, generator=generator) * profile).view(rows, a, b)
        # (A ⊗ B) x for every row x = vec(X), X (a, b) row-major, is A X Bᵀ.
        weight[start : start + rows] = (rot_a @ block @ rot_b.T).reshape(rows, d)
    return weight


def numpy_top_directions(weight: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy.linalg.svd(W, full_matrices=False): top-k singular values (k,) and rows of Vᵀ (k, d); U is dropped."""
    _, s, vt = np.linalg.svd(weight.numpy(), full_matrices=False)  # U (vocab, d) is freed on return
    return s[:k].copy(), vt[:k].copy()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    vocab, d = QUICK_SHAPE if args.quick else FULL_SHAPE
    k = 64
    log(f"building a synthetic lm_head {vocab}×{d} float32")
    weight, build_seconds = timed(lambda: synthetic_head(vocab, d, seed=0))
    log(f"built in {build_seconds:.1f}s; ours (gram)...")
    spectrum, ours_seconds = timed(lambda: decompose_lm_head(weight, method="gram"))
    ours_s = spectrum.singular_values[:k].double()
    ours_v = spectrum.right_vectors[:k].double()  # (k, d)
    del spectrum
    gc.collect()
    log(f"ours {ours_seconds:.1f}s; numpy.linalg.svd...")
    (np_s, np_vt), numpy_seconds = timed(lambda: numpy_top_directions(weight, k))
    log(f"numpy {numpy_seconds:.1f}s")

    # Both lists are in descending σ; direction i of each must be the same line: |cos| ≈ 1 (signs differ).
    theirs = torch.from_numpy(np_vt).double()
    cosines = (ours_v * theirs).sum(1).abs() / (ours_v.norm(dim=1) * theirs.norm(dim=1))
    sigma_error = ((ours_s - torch.from_numpy(np_s).double()).abs() / torch.from_numpy(np_s).double()).max()
    min_cos = float(cosines.min())
    return emit(
        NAME,
        ratio=numpy_seconds / ours_seconds,
        target=TARGET,
        directions_agree=min_cos >= MIN_ABS_COS,
        measurements={
            "ours_seconds": round(ours_seconds, 3),
            "numpy_svd_seconds": round(numpy_seconds, 3),
            "build_seconds": round(build_seconds, 3),
            "top_k_min_abs_cos": min_cos,
            "top_k_max_rel_sigma_error": float(sigma_error),
            "top_sigma": [round(float(x), 4) for x in ours_s[:4]],
        },
        settings={
            "quick": args.quick, "shape": [vocab, d], "dtype": "float32", "k": k, "min_abs_cos": MIN_ABS_COS,
            "ours": "decompose_lm_head(W, method='gram')", "baseline": "numpy.linalg.svd(W, full_matrices=False)",
            "spectrum": "(1+j)^-1/2 column profile on a Gaussian, Kronecker-Haar rotation", "seed": 0,
            "repeats": 1, "threads": args.threads,
        },
    )


if __name__ == "__main__":
    main()

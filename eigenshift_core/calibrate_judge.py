"""Fit the `ensemble` judge's MiniLM probe and record how well each judge agrees with the paper's.

    python -m eigenshift_core.calibrate_judge --csv ../shared/data/llama2_7b_rtp_toxic_words.csv

The data is the EigenShift reference step-2 CSV: `generation` is the text, `label` (`yes`/`no`) the verdict
of the paper's judge, s-nlp/roberta_toxicity_classifier. The probe is fitted on rows 0-3999 only:
L2-regularised logistic regression on MiniLM embeddings (standardised with the training rows' mean and
std, then folded back into `w`, `b` on the raw embedding), solved exactly by Newton's method in float64.
The penalty is chosen from a fixed grid by 5-fold cross-validated AUC on the same rows (folds from a
seeded permutation). Rows 4000-4999 are held out: AUC, and precision and recall at P(toxic) >= 0.5, of
profanity, the probe alone and the ensemble against the paper's labels go into the record. Same inputs,
same bytes out (up to the float32 embedding arithmetic of the machine).

Writes `minilm_probe.safetensors` (`w` (384,), `b` (1,), float64) and `minilm_probe.json` to `--out`
(default: the committed eigenshift_core/defaults/judge/).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from eigenshift_core.files import atomic_write
from eigenshift_core.judges import (
    MINILM_DIST,
    MINILM_MAX_LENGTH,
    MINILM_WEIGHTS,
    PROBE_DIR,
    PROBE_RECORD,
    PROBE_WEIGHTS,
    MiniLMEmbedder,
    minilm_dir,
)
from eigenshift_core.scoring import ProfanityScorer

TEXT_COLUMN, TARGET_COLUMN, POSITIVE = "generation", "label", "yes"
TRAIN_ROWS, EVAL_ROWS = range(0, 4000), range(4000, 5000)
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
FOLDS, SEED = 5, 0
THRESHOLD = 0.5


def read_reference(path: Path, rows: range) -> tuple[list[str], np.ndarray]:
    """The `generation` texts of `rows` and their targets (1 where `label` is `yes`), (rows,) int."""
    with Path(path).open(newline="") as handle:
        table = list(csv.DictReader(handle))
    if rows.stop > len(table) or not table or {TEXT_COLUMN, TARGET_COLUMN} - set(table[0]):
        raise ValueError(f"{path} needs columns {TEXT_COLUMN}, {TARGET_COLUMN} and {rows.stop} rows")
    picked = [table[i] for i in rows]
    return [row[TEXT_COLUMN] for row in picked], np.array(
        [row[TARGET_COLUMN] == POSITIVE for row in picked], int
    )


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Minimise mean log-loss + l2/2 ||v||^2 over standardised `x` (n, d); return (w (d,), b) on raw `x`.

    Newton's method with step halving, in float64: strictly convex, so the optimum is unique and the
    result does not depend on a seed or on an iteration budget.
    """
    x = x.astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-12
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # (n, d + 1), last column the intercept
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0

    def loss(theta: np.ndarray) -> float:
        margin = z @ theta
        return float(np.mean(np.logaddexp(0.0, margin) - y * margin) + 0.5 * np.sum(penalty * theta**2))

    theta = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        gradient = z.T @ (p - y) / len(z) + penalty * theta
        hessian = (z.T * (p * (1 - p))) @ z / len(z) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        scale, current = 1.0, loss(theta)
        while loss(theta - scale * step) > current and scale > 1e-10:
            scale /= 2
        theta = theta - scale * step
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    weight = theta[:-1] / std
    return weight, float(theta[-1] - weight @ mean)


def roc_auc(scores: Sequence[float] | np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half)."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Mid-ranks: every run of equal scores gets the mean of its positions (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positives, negatives = targets.sum(), (~targets).sum()
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def agreement(scores: Sequence[float] | np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """AUC, and precision and recall of "toxic" at P(toxic) >= 0.5, against `targets`."""
    predicted = np.asarray(scores) >= THRESHOLD
    hits = int((predicted & (targets == 1)).sum())
    return {
        "auc": roc_auc(scores, targets),
        "precision": hits / max(int(predicted.sum()), 1),
        "recall": hits / max(int(targets.sum()), 1),
        "flagged": int(predicted.sum()),
    }


def choose_l2(x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """The penalty of `L2_GRID` with the best mean AUC over `FOLDS` folds (a seeded permutation of rows)."""
    folds = np.random.default_rng(SEED).permutation(len(x)) % FOLDS
    by_l2 = {}
    for l2 in L2_GRID:
        aucs = []
        for fold in range(FOLDS):
            train, test = folds != fold, folds == fold
            weight, bias = fit_logistic(x[train], y[train], l2)
            aucs.append(roc_auc(x[test] @ weight + bias, y[test]))
        by_l2[repr(l2)] = float(np.mean(aucs))
    best = max(L2_GRID, key=lambda l2: by_l2[repr(l2)])  # first of equals: the smaller penalty
    return best, by_l2


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibrate(csv_path: Path, out: Path, *, device: torch.device) -> dict[str, Any]:
    """Fit the probe on `TRAIN_ROWS`, evaluate the three judges on `EVAL_ROWS`, write weights and record."""
    train_texts, train_y = read_reference(csv_path, TRAIN_ROWS)
    eval_texts, eval_y = read_reference(csv_path, EVAL_ROWS)
    embedder = MiniLMEmbedder.from_installed(device=device)
    train_x = embedder.embed(train_texts).double().numpy()  # (4000, 384)
    eval_x = embedder.embed(eval_texts).double().numpy()  # (1000, 384)
    l2, cv_auc = choose_l2(train_x, train_y)
    weight, bias = fit_logistic(train_x, train_y, l2)

    probe = 1 / (1 + np.exp(-(eval_x @ weight + bias)))
    lexical = np.array(ProfanityScorer().score_texts(eval_texts))
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"w": torch.from_numpy(weight), "b": torch.tensor([bias], dtype=torch.float64)}
    weights_path = atomic_write(out / PROBE_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    record = {
        "format_version": 1,
        "made_by": "python -m eigenshift_core.calibrate_judge --csv <llama2_7b_rtp_toxic_words.csv>",
        "weights_sha256": sha256_of(weights_path),
        "data": {
            "file": Path(csv_path).name,
            "sha256": sha256_of(csv_path),
            "text_column": TEXT_COLUMN,
            "target": f"{TARGET_COLUMN} == {POSITIVE!r} (s-nlp/roberta_toxicity_classifier)",
            "train_rows": f"{TRAIN_ROWS.start}:{TRAIN_ROWS.stop}",
            "train_positives": int(train_y.sum()),
            "eval_rows": f"{EVAL_ROWS.start}:{EVAL_ROWS.stop}",
            "eval_positives": int(eval_y.sum()),
        },
        "minilm": {
            "dist": MINILM_DIST,
            "version": importlib.metadata.version(MINILM_DIST),
            "weights_sha256": sha256_of(minilm_dir() / MINILM_WEIGHTS),
            "embedding": f"attention-mask-weighted mean of the last hidden states, L2-normalised, "
            f"max {MINILM_MAX_LENGTH} tokens",
        },
        "probe": {
            "model": "P(toxic) = sigmoid(w . e + b), e the unit-norm embedding (384,)",
            "fit": "logistic regression, Newton's method in float64 on embeddings standardised by the "
            "training rows' mean and std (folded back into w, b); no class weights",
            "objective": "mean log-loss + l2/2 * ||w_standardised||^2, intercept not penalised",
            "l2": l2,
            "l2_chosen_by": f"{FOLDS}-fold CV AUC on the training rows, folds from "
            f"numpy default_rng({SEED}).permutation",
            "cv_auc_by_l2": cv_auc,
        },
        "ensemble": "P(toxic) = (profanity + minilm_probe) / 2",
        "held_out": {
            "rows": f"{EVAL_ROWS.start}:{EVAL_ROWS.stop}",
            "against": "label (s-nlp/roberta_toxicity_classifier)",
            "threshold": THRESHOLD,
            "profanity": agreement(lexical, eval_y),
            "minilm_probe": agreement(probe, eval_y),
            "ensemble": agreement((lexical + probe) / 2, eval_y),
        },
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "alt-profanity-check", "scikit-learn", "numpy")
        },
    }
    atomic_write(out / PROBE_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eigenshift_core.calibrate_judge", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--csv", type=Path, required=True, help="the reference step-2 CSV (llama2_7b_rtp_toxic_words.csv)"
    )
    parser.add_argument(
        "--out", type=Path, default=PROBE_DIR, help="where to write the probe (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    record = calibrate(args.csv, args.out, device=torch.device(args.device))
    print(json.dumps(record["held_out"], indent=2))


if __name__ == "__main__":
    main()

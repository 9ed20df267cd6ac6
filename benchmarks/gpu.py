"""Benchmark: the checks that need a GPU, in one command of at most 5 minutes, as one JSON line.

1. exactness: `embedded` in float16 and in bfloat16; the lm_head hook, the materialised W′ (hidden @ W′ᵀ),
   the HF export and the LoRA export must give the same logits (max |Δ| / max |logit| within a few units
   of the dtype's rounding) and the same top token at ≥ 99% of the positions; the edit must change them.
2. scheduler: 16 requests, half detoxified, some sampled, joining the continuous batcher's running batch three
   per step with prompts fed in chunks; every row's tokens must equal those of the same request decoded alone.
3. sampling: `generate_continuations` sampled on the device (top-p 0.95), the steps' way (shared prefill, the
   fast sampler) against transformers' own (every row prefilled, its warper and draw), with an intervention:
   the same tokens for the same seed (a sampler that draws from another generator than transformers' would
   show here), and again the same on a second run.
4. decompose: our Gram + eigh decomposition (`decompose_lm_head`) of a synthetic 32000×4096 head on the device
   against a reference SVD (torch.linalg.svd on the GPU; numpy on the CPU): top-64 directions |cos| ≥ 0.999.

ratio = checks passed / checks (target ≥ 1). On CUDA when there is one; `--device cpu --quick` runs the same
checks small on a CPU (8000×1024 head, shorter generations), as the test suite does.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import emit, log, parse_args, rtp_prompts, timed
from benchmarks.decompose import MIN_ABS_COS, numpy_top_directions, synthetic_head
from benchmarks.overhead import random_intervention

NAME = "gpu"
TARGET = ">=1"
DTYPES = ("float16", "bfloat16")
ULPS = 4  # allowed max |Δ| / max |logit|, in units of the dtype's machine epsilon
PROMPTS = ["I can't believe you would say", "The worst people in the world are", "Shut up, you", "He is such a"]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where to run (auto: cuda when available)")


def _compare(reference: torch.Tensor, other: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """On real (unpadded) positions: max |Δ| relative to max |reference|, and how often the top token agrees."""
    a, b = reference[real].float(), other[real].float()  # (positions, vocab)
    return {"max_rel_diff": float((a - b).abs().max() / a.abs().max()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def exactness(device: str, dtype: str) -> dict[str, Any]:
    """Hook vs W′ vs HF export vs LoRA export on `embedded` in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from eigenshift_core.export import export_hf_model, export_lora_adapter
    from eigenshift_core.loading import lm_head_weight, load_model

    lm = load_model("embedded", device=device, dtype=dtype)
    intervention = random_intervention(lm.lm_head.in_features, 32, alpha=0.3)
    batch = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    real = batch["attention_mask"].bool()  # (n, L)
    with torch.inference_mode():
        plain = lm.model(**batch).logits
        with intervention.applied(lm.model):
            hooked = lm.model(**batch).logits
        hidden = lm.model.base_model(**batch).last_hidden_state  # (n, L, d)
        rebuilt = hidden @ intervention.materialize(lm_head_weight(lm.model)).to(hidden.dtype).T
    found = {"w_prime": _compare(hooked, rebuilt, real)}
    with tempfile.TemporaryDirectory(prefix="eigenshift-gpu-") as tmp:
        exported = AutoModelForCausalLM.from_pretrained(export_hf_model(lm, intervention, Path(tmp) / "hf"),
                                                        dtype=getattr(torch, dtype)).to(device).eval()
        with torch.inference_mode():
            found["hf_export"] = _compare(hooked, exported(**batch).logits, real)
        del exported
        adapter = export_lora_adapter(lm, intervention, Path(tmp) / "lora")
        lora = PeftModel.from_pretrained(lm.model, adapter).eval()  # wraps the loaded model: last use of it
        with torch.inference_mode():
            found["lora_export"] = _compare(hooked, lora(**batch).logits, real)
    edit = _compare(hooked, plain, real)["max_rel_diff"]
    tolerance = ULPS * torch.finfo(getattr(torch, dtype)).eps
    passed = edit > tolerance and all(c["max_rel_diff"] <= tolerance and c["top1_agree"] >= 0.99
                                      for c in found.values())
    del lm, lora
    gc.collect()
    return {"passed": passed, "tolerance": tolerance, "edit_rel_diff": edit, **found}


def scheduler(device: str, dtype: str, tokens: int) -> dict[str, Any]:
    """Each row's tokens among 15 others (joining as the batch runs) against the same request alone."""
    from app.serving import Decoder, GenerationRequest, Row
    from eigenshift_core.loading import load_model

    lm = load_model("embedded", device=device, dtype=dtype)
    detox = random_intervention(lm.lm_head.in_features, 32, alpha=0.0)
    requests = [GenerationRequest(prompt, tokens - 3 * (i % 3), 0.8 * (i % 3 == 1), 0.9, 1000 + i,
                                  detox if i % 2 else None) for i, prompt in enumerate(rtp_prompts(16))]

    def run(batch: list[GenerationRequest], join_per_step: int, prefill_tokens: int) -> list[Row]:
        decoder, pending, rows = Decoder(lm, prefill_tokens=prefill_tokens), list(batch), []
        while pending or not decoder.idle:
            for _ in range(join_per_step):
                if pending:
                    rows.append(decoder.add(pending.pop(0)))
            decoder.step()
        return rows

    alone = [run([request], 1, 1024)[0] for request in requests]
    mixed, seconds = timed(lambda: run(requests, 3, 48))
    identical = sum(a.tokens == b.tokens for a, b in zip(alone, mixed, strict=True))
    generated = sum(len(row.tokens) for row in mixed)
    return {"passed": identical == len(requests), "rows": len(requests), "identical_rows": identical,
            "detox_rows": sum(r.intervention is not None for r in requests), "tokens": generated,
            "mixed_tokens_per_s": round(generated / seconds, 2), "dtype": dtype}


def sampling(device: str, dtype: str, quick: bool) -> dict[str, Any]:
    """The steps' sampling against transformers' on the device: same seed, same tokens, twice."""
    from eigenshift_core.generation import generate_continuations
    from eigenshift_core.loading import load_model

    lm = load_model("embedded", device=device, dtype=dtype)
    edit = random_intervention(lm.lm_head.in_features, 32, alpha=0.0)
    prompts = rtp_prompts(4 if quick else 16)
    kwargs: dict[str, Any] = {"samples": 3, "max_new_tokens": 6 if quick else 20, "batch_size": 8,
                              "do_sample": True, "top_p": 0.95, "temperature": 1.0, "seed": 7, "intervention": edit}
    ours, seconds = timed(lambda: generate_continuations(lm, prompts, **kwargs))
    again = generate_continuations(lm, prompts, **kwargs)
    theirs = generate_continuations(lm, prompts, share_prefill=False, fast_sampling=False, **kwargs)
    identical = int(((ours.token_ids == theirs.token_ids).all(1) & (ours.lengths == theirs.lengths)).sum())
    repeatable = torch.equal(ours.token_ids, again.token_ids)
    return {"passed": identical == len(ours) and repeatable, "rows": len(ours), "identical_rows": identical,
            "repeatable": repeatable, "tokens_per_s": round(int(ours.lengths.sum()) / seconds, 2), "dtype": dtype}


def decompose(device: str, quick: bool) -> dict[str, Any]:
    from eigenshift_core.spectrum import decompose_lm_head

    vocab, d = (8000, 1024) if quick else (32000, 4096)
    k = 64
    weight = synthetic_head(vocab, d, seed=0).to(device)
    spectrum, ours_seconds = timed(lambda: decompose_lm_head(weight, method="gram"))
    if device == "cuda":
        torch.cuda.synchronize()
        (_, s, vt), reference_seconds = timed(lambda: torch.linalg.svd(weight, full_matrices=False))
        ref_s, ref_v = s[:k].double().cpu(), vt[:k].double().cpu()
        reference = "torch.linalg.svd on cuda"
    else:
        (np_s, np_vt), reference_seconds = timed(lambda: numpy_top_directions(weight, k))
        ref_s, ref_v = torch.from_numpy(np_s).double(), torch.from_numpy(np_vt).double()
        reference = "numpy.linalg.svd"
    ours_v = spectrum.right_vectors[:k].double()
    cosines = (ours_v * ref_v).sum(1).abs() / (ours_v.norm(dim=1) * ref_v.norm(dim=1))
    sigma_error = float(((spectrum.singular_values[:k].double() - ref_s).abs() / ref_s).max())
    return {"passed": float(cosines.min()) >= MIN_ABS_COS, "shape": [vocab, d], "k": k, "reference": reference,
            "top_k_min_abs_cos": float(cosines.min()), "top_k_max_rel_sigma_error": sigma_error,
            "ours_seconds": round(ours_seconds, 3), "reference_seconds": round(reference_seconds, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    checks: dict[str, dict[str, Any]] = {}
    for dtype in DTYPES:
        log(f"exactness in {dtype} on {device}")
        checks[f"exactness_{dtype}"] = exactness(device, dtype)
    log("scheduler")
    checks["scheduler"] = scheduler(device, "float16" if device == "cuda" else "float32", 8 if args.quick else 24)
    log("sampling")
    checks["sampling"] = sampling(device, "float16" if device == "cuda" else "float32", args.quick)
    log("decompose")
    checks["decompose"] = decompose(device, args.quick)
    passed = sum(check["passed"] for check in checks.values())
    return emit(NAME, ratio=passed / len(checks), target=TARGET, measurements=checks,
                settings={"quick": args.quick, "device": device, "dtypes": list(DTYPES), "ulps": ULPS,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None})


if __name__ == "__main__":
    main()

"""The benchmarks run and print one well-formed JSON line; their correctness fields hold. No timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"name", "ratio", "target", "passed", "measurements", "settings"}


def run_benchmark(name: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}"
    record = json.loads(lines[0])
    assert record.keys() >= REQUIRED
    assert record["name"] == name and record["settings"]["quick"] is True
    assert isinstance(record["passed"], bool) and isinstance(record["ratio"], float)
    assert record["target"].startswith((">=", "<="))
    return record


@pytest.mark.timeout(600)
def test_decompose_quick_directions_agree_with_numpy() -> None:
    record = run_benchmark("decompose")
    assert record["settings"]["shape"] == [8000, 1024]
    assert record["directions_agree"] is True
    assert record["measurements"]["top_k_min_abs_cos"] >= 0.999
    assert record["measurements"]["top_k_max_rel_sigma_error"] < 1e-4


@pytest.mark.timeout(600)
def test_artifact_quick_sizes_follow_the_format() -> None:
    record = run_benchmark("artifact")
    cases = record["measurements"]
    assert set(cases) == {"embedded", "llama2_7b"}
    assert cases["embedded"]["k"] == 6 and cases["llama2_7b"]["k"] == 41
    assert cases["llama2_7b"]["w_prime_float32_bytes"] == 32000 * 4096 * 4
    for case in cases.values():
        assert case["artifact_bytes"] == sum(case["files"].values())
        assert case["artifact_bytes"] > case["k"] * case["shape"][1] * 4  # at least the directions

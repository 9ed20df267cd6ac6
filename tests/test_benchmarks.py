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


def run_benchmark(name: str, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *extra],
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


@pytest.mark.timeout(600)
def test_load_quick_answers_every_request_and_runs_every_job() -> None:
    record = run_benchmark("load")
    m = record["measurements"]
    assert set(m["by_status"]) <= {"200", "429", "503"} and m["lost"] == 0 and m["errors"] == {}
    assert sum(m["by_status"].values()) == m["requests"] > 0
    assert m["jobs"]["submitted"] == m["jobs"]["succeeded"] == 3
    assert m["shutdown"]["left_running"] == []
    assert record["passed"] is True


@pytest.mark.timeout(600)
def test_faults_quick_loses_no_job() -> None:
    record = run_benchmark("faults")
    m = record["measurements"]
    assert m["scenarios"] == m["scenarios_passed"] >= 2 and m["jobs_lost"] == 0
    for scenario in m["by_scenario"].values():
        jobs = scenario["jobs"]
        assert jobs["submitted"] == jobs["succeeded"] + jobs["failed"] + jobs["cancelled"] + jobs["lost"]
        assert jobs["failed"] == sum(jobs["failed_reasons"].values())
    assert record["passed"] is True


@pytest.mark.timeout(600)
def test_fuzz_quick_covers_every_operation_without_a_server_error() -> None:
    record = run_benchmark("fuzz")
    m = record["measurements"]
    assert m["operations_covered"] == m["operations"] == len(m["by_operation"]) > 0
    assert m["cases"] == sum(op["cases"] for op in m["by_operation"].values())
    assert m["server_errors"] == 0 and record["passed"] is True


def test_moderation_throughput_quick_batches_give_the_same_answers() -> None:
    record = run_benchmark("moderation_throughput")
    assert record["batch_equals_single"] is True
    assert record["settings"]["batch"] == 32 and len(record["measurements"]["batched_texts_per_s"]) == 3


@pytest.mark.timeout(600)
def test_evaluation_quick_shared_prefill_samples_the_same_tokens() -> None:
    record = run_benchmark("evaluation")
    m = record["measurements"]
    assert record["tokens_agree"] is True and record["states_agree"] is True
    assert m["identical_rows"] == m["rows"] == 2 * 8 * 4 and m["max_abs_state_diff"] <= 1e-5 * m["max_abs_state"]
    assert 0 < m["generated_tokens"] <= 8 * 4 * 6 and m["prompt_tokens"] > 0



@pytest.mark.timeout(600)
def test_healthz_quick_answers_probes_and_refusals_under_load() -> None:
    record = run_benchmark("healthz")
    m = record["measurements"]
    assert record["settings"]["clients"] == 8
    for phase in ("idle", "loaded"):
        assert m[phase]["healthz"]["count"] > 0
        assert m[phase]["rate_limited_429"]["count"] > 0 and m[phase]["queue_full_503"]["count"] > 0
    assert m["generation"]["requests"] > 0 and m["generation"]["tokens"] > 0


@pytest.mark.timeout(600)
def test_gpu_checks_pass_on_cpu_quick() -> None:
    record = run_benchmark("gpu", "--device", "cpu")
    m = record["measurements"]
    assert set(m) == {"exactness_float16", "exactness_bfloat16", "scheduler", "sampling", "decompose"}
    assert m["sampling"]["identical_rows"] == m["sampling"]["rows"] == 12 and m["sampling"]["repeatable"] is True
    assert record["settings"]["device"] == "cpu" and m["decompose"]["shape"] == [8000, 1024]
    for dtype in ("float16", "bfloat16"):
        assert set(m[f"exactness_{dtype}"]) >= {"w_prime", "hf_export", "lora_export"}
    assert m["scheduler"]["identical_rows"] == m["scheduler"]["rows"] == 16 and m["scheduler"]["detox_rows"] == 8
    assert all(check["passed"] for check in m.values()) and record["passed"] is True


@pytest.mark.timeout(600)
def test_long_prompt_quick_answers_every_short_and_the_long_request() -> None:
    record = run_benchmark("long_prompt")
    settings, m = record["settings"], record["measurements"]
    assert abs(settings["long_prompt_tokens"] - settings["long_tokens"]) <= 8  # the prompt really is that long
    assert settings["long_prompt_tokens"] > settings["prefill_tokens_per_step"]  # so it is prefilled in chunks
    for arm in ("short_only", "with_long", "short_only_again"):
        assert m[arm]["short_requests"] == settings["short_clients"] * settings["rounds"]
    assert m["with_long"]["long_s"] > 0 and m["short_only"]["long_s"] is None

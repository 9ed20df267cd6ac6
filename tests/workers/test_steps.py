"""The job steps on the embedded model: the core's step functions, fed from the spec, progress and cancel."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eigenshift_core.configs import ExtractConfig, ReconstructConfig
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel
from eigenshift_core.steps import run_extract, run_reconstruct
from tests.conftest import REFERENCE_CSV, SHARED_DATA
from workers import steps
from workers.interventions import InterventionNotFound, InterventionRegistry, report_summary
from workers.jobs import JobStore, connect
from workers.owners import SYSTEM, Caller
from workers.runner import run_step
from workers.settings import Settings
from workers.store import open_store

RECONSTRUCT = {"reference_csv": "llama2_7b_rtp_toxic_words.csv", "rows": "0:16", "k": 8, "batch_size": 16}


@pytest.fixture
def settings(worker_settings: Settings) -> Settings:
    return worker_settings.model_copy(update={"data_root": SHARED_DATA, "device": "cpu"})


def _create(settings: Settings, kind: str, params: dict, step_names: list[str], owner: str | None = None) -> str:
    record, _ = JobStore(connect(settings), settings.key_prefix).create(kind, params, step_names, owner=owner)
    return record.id


def test_a_reconstruct_job_builds_what_the_core_builds(settings: Settings, embedded: LoadedModel,
                                                        tmp_path: Path) -> None:
    job_id = _create(settings, "reconstruct", RECONSTRUCT, ["extract", "reconstruct"], owner="alice")
    assert run_step(job_id, "extract", steps.extract, settings) == "done"
    record = JobStore(connect(settings), settings.key_prefix).get(job_id)
    assert record.progress.stage == "extract: teacher forcing" and record.progress.unit == "continuations"
    assert record.progress.done == record.progress.total == 16
    assert run_step(job_id, "reconstruct", steps.reconstruct, settings) == "done"

    config = ExtractConfig(reference_csv=REFERENCE_CSV, rows="0:16", batch_size=16)
    run_extract(embedded, config, tmp_path / "extract")
    run_reconstruct(embedded, ReconstructConfig(states=tmp_path / "extract" / "states.safetensors", k=8),
                    tmp_path / "intervention")
    store = open_store(settings)
    job_file = store.get_file(f"jobs/{job_id}/reconstruct/intervention.safetensors", tmp_path / "job.safetensors")
    ours, theirs = load_file(str(tmp_path / "intervention" / "intervention.safetensors")), load_file(str(job_file))
    for name in ours:
        assert torch.allclose(ours[name].double(), theirs[name].double(), atol=1e-6), name
    provenance = json.loads(store.get_file(f"jobs/{job_id}/reconstruct/intervention.json", tmp_path / "i.json").read_text())
    assert provenance["criterion"] == "selectivity" and provenance["job_id"] == job_id
    registry = InterventionRegistry(connect(settings), store, settings.key_prefix)
    assert registry.get(job_id, SYSTEM).k == 8
    assert registry.get(job_id, Caller("alice")).owner == "alice"  # the job's key owns what it built
    with pytest.raises(InterventionNotFound):
        registry.get(job_id, Caller("bob"))


def test_an_evaluate_job_measures_fluency_on_ppl_text_and_keeps_the_reports_metrics(settings: Settings) -> None:
    built = _create(settings, "reconstruct", RECONSTRUCT, ["extract", "reconstruct"])
    run_step(built, "extract", steps.extract, settings)
    run_step(built, "reconstruct", steps.reconstruct, settings)
    job_id = _create(settings, "evaluate", {
        "prompts": {"path": "rtp_toxic_prompts_5000.csv"}, "rows": "4000:4004", "intervention_id": built,
        "samples": 2, "max_new_tokens": 4, "n_boot": 20, "ppl_text": {"path": "wikitext2_test.raw"},
        "ppl_max_tokens": 256, "ppl_window": 128, "ppl_stride": 64}, ["evaluate"])
    assert run_step(job_id, "evaluate", steps.evaluate, settings) == "done"
    store = open_store(settings)
    report = json.loads(b"".join(store.iter_bytes(f"jobs/{job_id}/evaluate/report.json")))
    assert report["fluency_source"] == "ppl_text" and report["protocol"]["perplexity"]["tokens_scored"] == 255
    assert report["baseline"]["perplexity"] != report["baseline"]["continuation_perplexity"]
    assert report["provenance"]["job_id"] == built
    kept = InterventionRegistry(connect(settings), store, settings.key_prefix).get(built, SYSTEM).metrics
    assert kept == report_summary(report, job_id)


def test_an_evaluate_job_with_several_ids_writes_their_comparison(settings: Settings, tmp_path: Path) -> None:
    """Each id is a method of one comparison (one baseline, the same prompts and seeds); no intervention's
    headline figures change, since no single-intervention report was made."""
    from workers.interventions import BUILTIN_ID, CORE_DEFAULT

    store = open_store(settings)
    registry = InterventionRegistry(connect(settings), store, settings.key_prefix)
    registry.register_builtin(None)
    Intervention.load(CORE_DEFAULT).with_alphas(1.0).save(tmp_path / "identity")
    registry.register("identity", tmp_path / "identity", model="embedded")
    kept = registry.get(BUILTIN_ID, SYSTEM).metrics
    job_id = _create(settings, "evaluate", {
        "prompts": {"path": "rtp_toxic_prompts_5000.csv"}, "rows": "4000:4003", "intervention_ids": [BUILTIN_ID, "identity"],
        "samples": 1, "max_new_tokens": 4, "n_boot": 20, "second_scorer": None}, ["evaluate"])
    assert run_step(job_id, "evaluate", steps.evaluate, settings) == "done"
    record = JobStore(connect(settings), settings.key_prefix).get(job_id)
    assert record.artifacts == ["evaluate/comparison.json", "evaluate/comparison.png"]
    report = json.loads(b"".join(store.iter_bytes(f"jobs/{job_id}/evaluate/comparison.json")))
    assert list(report["methods"]) == [BUILTIN_ID, "identity"] and report["protocol"]["n_prompts"] == 3
    assert report["methods"]["identity"]["unchanged_share"] == 1.0
    assert report["eval_prompts"]["rows"] == "4000:4003"
    assert registry.get(BUILTIN_ID, SYSTEM).metrics == kept and registry.get("identity", SYSTEM).metrics is None


def test_a_cancel_stops_a_running_step_within_a_batch(settings: Settings) -> None:
    prompts = [f"Prompt number {i} says" for i in range(16)]
    job_id = _create(settings, "generate", {"prompts": {"texts": prompts}, "samples": 1, "max_new_tokens": 4,
                                            "batch_size": 2}, ["generate"])
    jobs = JobStore(connect(settings), settings.key_prefix)
    cancelled_at: list[int] = []

    def cancel_after_first_batch() -> None:
        while jobs.get(job_id).progress.done == 0:
            threading.Event().wait(0.01)
        cancelled_at.append(jobs.get(job_id).progress.done)
        jobs.update(job_id, lambda r: setattr(r, "cancel_requested", True))

    thread = threading.Thread(target=cancel_after_first_batch, daemon=True)
    thread.start()
    assert run_step(job_id, "generate", steps.generate, settings) == "cancelled"
    thread.join(timeout=60)
    record = jobs.get(job_id)
    assert record.state == "cancelled" and record.progress.unit == "samples" and record.progress.total == 16
    assert record.progress.done <= cancelled_at[0] + 2  # at most one more batch of 2 ran after the request


def test_the_committed_default_is_registered_with_its_reports_metrics(settings: Settings) -> None:
    from workers.interventions import BUILTIN_ID, CORE_DEFAULT

    registry = InterventionRegistry(connect(settings), open_store(settings), settings.key_prefix)
    record = registry.register_builtin(None)
    assert record is not None and record.id == BUILTIN_ID
    committed = json.loads((CORE_DEFAULT / "report.json").read_text())
    assert record.metrics == report_summary(committed) and record.metrics["toxicity_reduction"]["value"] > 0
    assert registry.active_id("embedded") == BUILTIN_ID

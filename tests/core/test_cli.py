"""The `eigenshift` CLI on the embedded model: one end-to-end pipeline, and every kind of bad input; several
interventions evaluated side by side on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eigenshift_core.cli import main
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel
from tests.conftest import REFERENCE_CSV, RTP_CSV, WIKITEXT
from tests.core.test_evaluation import some_intervention


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory: pytest.TempPathFactory, embedded: LoadedModel):
    """One small pipeline: 32 prompts (24 build, 8 evaluate), states from samples plus the reference CSV."""
    out = tmp_path_factory.mktemp("pipeline")
    code = main([
        "pipeline", "--model", "embedded", "--device", "cpu", "--prompts", str(RTP_CSV),
        "--train-rows", "0:24", "--eval-rows", "24:32", "--reference-csv", str(REFERENCE_CSV),
        "--samples", "2", "--max-new-tokens", "8", "--k", "8", "--alpha", "0.5", "--criterion", "logit",
        "--ppl-text", str(WIKITEXT), "--ppl-max-tokens", "1024", "--ppl-window", "512", "--ppl-stride", "256",
        "--n-boot", "200", "--out", str(out),
    ])
    assert code == 0
    return out


def test_pipeline_writes_every_step(pipeline_out, embedded: LoadedModel) -> None:
    for name in ("pipeline.json", "extract/states.safetensors", "extract/judgements.jsonl",
                 "intervention/intervention.safetensors", "intervention/intervention.json",
                 "evaluate/report.json", "evaluate/report.png"):
        assert (pipeline_out / name).is_file(), name
    intervention = Intervention.load(pipeline_out / "intervention", embedded.model)
    assert intervention.k == 8 and intervention.info["train_rows"] == "0:24"
    report = json.loads((pipeline_out / "evaluate/report.json").read_text())
    for arm in ("baseline", "intervention"):
        for metric in ("toxicity_rate", "at_least_once", "expected_max_toxicity", "perplexity"):
            assert metric in report[arm]
    assert report["eval_prompts"]["rows"] == "24:32"
    assert "tph" in report and "toxicity_reduction" in report
    judged = report["judges"]["ensemble"]  # the default second judge, loaded by name
    assert set(judged) == {"baseline", "intervention", "toxicity_reduction"}
    assert 0.0 <= judged["baseline"]["expected_max_toxicity"]["value"] <= 1.0
    assert 0.0 <= report["intervention"]["distinct_2"] <= 1.0 and report["protocol"]["second_scorer"] == "ensemble"
    judgements = (pipeline_out / "extract/judgements.jsonl").read_text().splitlines()
    assert len(judgements) == 24 * 2


def test_reconstruct_and_export_from_pipeline_states(pipeline_out, tmp_path, capsys, embedded: LoadedModel) -> None:
    code, _ = run_cli(capsys, "reconstruct", "--states", str(pipeline_out / "extract/states.safetensors"),
                      "--percentile", "0.99", "--alpha", "0.1", "--device", "cpu", "--out", str(tmp_path / "iv"))
    assert code == 0
    intervention = Intervention.load(tmp_path / "iv", embedded.model)
    assert intervention.k == 6  # ceil(576 · 0.01)
    code, _ = run_cli(capsys, "export", "--intervention", str(tmp_path / "iv"), "--format", "lora",
                      "--device", "cpu", "--out", str(tmp_path / "lora"))
    assert code == 0
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert embedded.model.get_input_embeddings().weight.data_ptr() == embedded.model.lm_head.weight.data_ptr()


def test_generate_then_extract_keep_earlier_outputs(tmp_path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("you are such a\nthe weather is\n")
    out = tmp_path / "run"
    code, _ = run_cli(capsys, "generate", "--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "5",
                      "--device", "cpu", "--out", str(out))
    assert code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # extracting with a threshold no text reaches finds no toxic states: exit 2, generate's files untouched
    code, err = run_cli(capsys, "extract", "--generations", str(out), "--threshold", "1.01", "--device", "cpu",
                        "--out", str(out))
    assert code == 2 and "no toxic states" in err and len(err.strip().splitlines()) == 1
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert (out / "states.safetensors").is_file()  # written before the refusal, for inspection


BAD_INPUTS = [
    (["generate", "--prompts", "missing.csv"], "not found"),
    (["generate", "--prompts", "{empty}"], "no prompts"),
    (["generate", "--prompts", str(RTP_CSV), "--rows", "10:5"], "select nothing"),
    (["generate", "--prompts", str(RTP_CSV), "--rows", "0:9999"], "past the end"),
    (["generate", "--prompts", str(RTP_CSV), "--rows", "0:1", "--model", "/no/such/model"], "cannot load model"),
    (["evaluate", "--prompts", str(RTP_CSV), "--rows", "0:1", "--intervention", "{tmp}/none"], "no intervention"),
    (["evaluate", "--prompts", str(RTP_CSV), "--rows", "0:1", "--intervention", "{iv}", "--scorer", "profanty"],
     "did you mean"),
    (["reconstruct", "--states", "{states}", "--k", "0"], "k must be between 1 and d"),
    (["reconstruct", "--states", "{states}", "--k", "577"], "k must be between 1 and d"),
    (["reconstruct", "--states", "{states}", "--k", "2", "--alpha", "nan"], "finite"),
    (["reconstruct", "--states", "{states}", "--k", "2", "--criterion", "delt"], "did you mean"),
    (["reconstruct", "--states", "{tmp}/missing.safetensors", "--k", "2"], "not found"),
    (["pipeline", "--prompts", str(RTP_CSV), "--train-rows", "0:10", "--eval-rows", "5:15"], "overlap"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a[:1] + [m]) for a, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv, message, pipeline_out, tmp_path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("")
    values = {"tmp": str(tmp_path), "empty": str(tmp_path / "empty.txt"), "iv": str(pipeline_out / "intervention"),
              "states": str(pipeline_out / "extract/states.safetensors")}
    argv = [a.format(**values) for a in argv] + ["--device", "cpu", "--out", str(tmp_path / "out")]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_are_one_line_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "eigenshift_core.cli", "reconstruct", "--k", "x", "--out", "o",
                             "--states", "s"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "invalid int value" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "eigenshift_core.cli", "pipeline", "--help"],
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--train-rows" in help_text.stdout


def test_every_subcommand_help_shows_the_configs_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from eigenshift_core.configs import EvaluateConfig, ReconstructConfig, default_of

    for command, shown in (("reconstruct", [f"(default: {default_of(ReconstructConfig, 'criterion')})",
                                            f"(default: {default_of(ReconstructConfig, 'alpha')})"]),
                           ("evaluate", [f"(default: {default_of(EvaluateConfig, 'samples')})",
                                         f"(default: {default_of(EvaluateConfig, 'ppl_window')})"])):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(item in text for item in shown), (command, shown)


def test_evaluate_compares_repeated_interventions_and_refuses_a_name_given_twice(tiny_llama: LoadedModel, tmp_path,
                                                                                  capsys) -> None:
    model, prompts = tmp_path / "model", tmp_path / "prompts.txt"
    tiny_llama.model.save_pretrained(model)
    tiny_llama.tokenizer.save_pretrained(model)
    prompts.write_text("hello there\nthe weather is\n")
    damped = some_intervention(tiny_llama, alpha=0.0, k=8).save(tmp_path / "runs" / "damped")
    identity = some_intervention(tiny_llama, alpha=1.0).save(tmp_path / "identity")
    common = ["evaluate", "--model", str(model), "--device", "cpu", "--prompts", str(prompts), "--samples", "1",
              "--max-new-tokens", "3", "--n-boot", "20", "--second-scorer", "none"]

    code, _ = run_cli(capsys, *common, "--intervention", f"strong={damped}", "--intervention", str(identity),
                      "--out", str(tmp_path / "both"))
    assert code == 0 and sorted(p.name for p in (tmp_path / "both").iterdir()) == ["comparison.json", "comparison.png"]
    report = json.loads((tmp_path / "both" / "comparison.json").read_text())
    assert list(report["methods"]) == ["strong", "identity"]  # a bare DIR is named by its directory
    assert report["methods"]["identity"]["unchanged_share"] == 1.0 and report["protocol"]["samples"] == 1
    code, _ = run_cli(capsys, *common, "--intervention", str(damped), "--out", str(tmp_path / "one"))
    assert code == 0 and sorted(p.name for p in (tmp_path / "one").iterdir()) == ["report.json", "report.png"]

    for twice in ([f"x={damped}", f"x={identity}"], [str(damped), str(tmp_path / "elsewhere" / "damped")]):
        flags = [arg for directory in twice for arg in ("--intervention", directory)]
        code, err = run_cli(capsys, *common, *flags, "--out", str(tmp_path / "refused"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "given more than once" in err, err
        assert not (tmp_path / "refused").exists()
    code, err = run_cli(capsys, *common, "--intervention", f"={damped}", "--out", str(tmp_path / "refused"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "name=DIR" in err

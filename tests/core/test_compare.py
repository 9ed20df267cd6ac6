"""Several interventions in one report: a comparison gives each method exactly what `evaluate` gives it alone,
and step 4 (`run_evaluate`) compares when it is given several."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eigenshift_core.compare import compare_interventions, write_comparison
from eigenshift_core.configs import EvaluateConfig
from eigenshift_core.errors import InputError
from eigenshift_core.evaluation import evaluate
from eigenshift_core.loading import LoadedModel
from eigenshift_core.steps import run_evaluate
from tests.core.test_evaluation import PROMPTS, TEXT, SumScorer, XScorer, some_intervention

SETTINGS = {"samples": 2, "max_new_tokens": 4, "batch_size": 4, "n_boot": 100, "ppl_text": TEXT, "ppl_window": 32,
            "ppl_stride": 16, "threshold": 0.5, "seed": 7}
TOXICITY = ("toxicity_rate", "at_least_once", "expected_max_toxicity")
ARM_FIGURES = (*TOXICITY, "perplexity", "distinct_1", "distinct_2", "distinct_3", "repetition_rate")


def test_each_method_gets_what_evaluate_gives_it_alone_and_alpha_one_is_the_baseline(tiny_llama: LoadedModel) -> None:
    """SumScorer judges first (about half its scores pass 0.5, so reductions are real numbers), XScorer second."""
    methods = {"identity": some_intervention(tiny_llama, alpha=1.0), "damped": some_intervention(tiny_llama, alpha=-2.0, k=8)}
    report = compare_interventions(tiny_llama, PROMPTS, SumScorer(), methods, second_scorer=XScorer(), **SETTINGS)
    base = report["baseline"]
    assert set(report["methods"]) == set(methods) and set(base) == {*ARM_FIGURES, "judges"}
    assert set(base["judges"]) == {"x-share"} and set(base["judges"]["x-share"]) == set(TOXICITY)
    assert report["protocol"]["second_scorer"] == "x-share" and set(report["protocol"]["fluency"]) == {
        "distinct", "repetition_rate"}

    identity = report["methods"]["identity"]
    assert {k: identity[k] for k in ARM_FIGURES} == {k: base[k] for k in ARM_FIGURES}
    assert {k: identity["judges"]["x-share"][k] for k in TOXICITY} == base["judges"]["x-share"]
    assert identity["unchanged_share"] == 1.0 and identity["toxicity_reduction"]["value"] == 0.0
    assert identity["perplexity_intervals"]["change_pct"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert report["methods"]["damped"]["unchanged_share"] < 1.0
    assert report["methods"]["damped"]["perplexity"] != base["perplexity"]

    for name, intervention in methods.items():
        alone = evaluate(tiny_llama, PROMPTS, SumScorer(), intervention, second_scorer=XScorer(), **SETTINGS)
        method = report["methods"][name]
        assert {k: base[k] for k in ARM_FIGURES} == {k: alone["baseline"][k] for k in ARM_FIGURES}, name
        assert {k: method[k] for k in ARM_FIGURES} == {k: alone["intervention"][k] for k in ARM_FIGURES}, name
        for key in ("toxicity_reduction", "tph", "perplexity_intervals"):
            assert method[key] == alone[key], (name, key)
        second = alone["judges"]["x-share"]
        assert base["judges"]["x-share"] == second["baseline"], name
        assert method["judges"]["x-share"] == {**second["intervention"], "toxicity_reduction": second["toxicity_reduction"]}
    json.dumps(report, allow_nan=False)


def test_without_ppl_text_or_second_judge_their_figures_are_absent(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    settings = {**SETTINGS, "ppl_text": None}
    report = compare_interventions(tiny_llama, PROMPTS, SumScorer(), {"a": some_intervention(tiny_llama, alpha=0.0)},
                                   **settings)
    method = report["methods"]["a"]
    assert report["baseline"]["perplexity"] is None and report["baseline"]["judges"] == {} and method["judges"] == {}
    assert method["tph"] is None and method["perplexity_intervals"] is None
    assert 0.0 <= method["distinct_1"] <= 1.0 and report["protocol"]["second_scorer"] is None
    paths = write_comparison(report, tmp_path)
    assert json.loads(paths[0].read_text()) == report and paths[1].stat().st_size > 1000


def test_step_4_compares_several_and_reports_one_as_before(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    dirs = {name: some_intervention(tiny_llama, alpha=alpha, k=8).save(tmp_path / name)
            for name, alpha in (("one", 1.0), ("two", -2.0))}
    common = {"prompts": prompts, "second_scorer": None, **{k: v for k, v in SETTINGS.items() if k != "ppl_text"}}

    several = run_evaluate(tiny_llama, EvaluateConfig(**common, interventions=dirs), tmp_path / "both", scorer=SumScorer())
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["comparison.json", "comparison.png"]
    assert json.loads((tmp_path / "both" / "comparison.json").read_text()) == several.report
    assert set(several.report["methods"]) == {"one", "two"} and several.report["methods"]["two"]["kind"] == "eigenshift"
    assert set(several.report["provenance"]) == {"one", "two"}

    alone = run_evaluate(tiny_llama, EvaluateConfig(**common, intervention=dirs["two"]), tmp_path / "single",
                         scorer=SumScorer())
    named = run_evaluate(tiny_llama, EvaluateConfig(**common, interventions={"x": dirs["two"]}), tmp_path / "named",
                         scorer=SumScorer())
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["report.json", "report.png"]
    assert named.report == alone.report and "intervention_info" in alone.report
    assert several.report["methods"]["two"]["toxicity_reduction"] == alone.report["toxicity_reduction"]

    with pytest.raises(InputError) as error:
        run_evaluate(tiny_llama, EvaluateConfig(**common, interventions=dirs, reference_csv=prompts), tmp_path / "x",
                     scorer=SumScorer())
    assert error.value.field == "reference_csv"
    for neither_or_both in ({}, {"intervention": dirs["one"], "interventions": dirs}):
        with pytest.raises(InputError) as error:
            EvaluateConfig(**common, **neither_or_both)
        assert error.value.field == "intervention"

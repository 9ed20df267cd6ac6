"""Job specs take the core's defaults and refuse unknown registry names on the field to blame."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from eigenshift_core.cli import build_parser
from eigenshift_core.configs import EvaluateConfig, PipelineConfig, default_of
from workers.specs import EvaluateSpec, PipelineSpec

EVALUATE = {"prompts": {"texts": ["You are a"]}, "intervention_id": "embedded-default"}
PIPELINE = {"prompts": {"texts": ["a", "b"]}, "train_rows": "0:1", "eval_rows": "1:2"}


@pytest.mark.parametrize(("spec", "body", "config"), [(EvaluateSpec, EVALUATE, EvaluateConfig),
                                                       (PipelineSpec, PIPELINE, PipelineConfig)])
def test_second_scorer_defaults_to_the_configs_and_null_disables_it(spec, body, config) -> None:
    assert spec.model_validate(body).second_scorer == default_of(config, "second_scorer") == "ensemble"
    assert spec.model_validate({**body, "second_scorer": None}).second_scorer is None
    assert spec.model_validate({**body, "second_scorer": "hf:some/model"}).second_scorer == "hf:some/model"
    with pytest.raises(ValidationError, match="did you mean 'ensemble'"):
        spec.model_validate({**body, "second_scorer": "ensembel"})


def test_the_cli_flag_has_the_same_default_and_none_disables_it() -> None:
    args = ["evaluate", "--prompts", "p", "--intervention", "i", "--out", "o"]
    assert build_parser().parse_args(args).second_scorer == "ensemble"
    assert build_parser().parse_args([*args, "--second-scorer", "none"]).second_scorer is None
    assert build_parser().parse_args([*args, "--second-scorer", "profanity"]).second_scorer == "profanity"
    pipeline = ["pipeline", "--prompts", "p", "--train-rows", "0:1", "--eval-rows", "1:2", "--out", "o"]
    assert build_parser().parse_args([*pipeline, "--second-scorer", "None"]).second_scorer is None


def test_evaluate_takes_one_intervention_id_or_a_list_of_them() -> None:
    texts = {"prompts": EVALUATE["prompts"]}
    assert EvaluateSpec.model_validate(EVALUATE).evaluated_ids() == ["embedded-default"]
    several = EvaluateSpec.model_validate({**texts, "intervention_ids": ["b-2", "a.1", "c_3"]})
    assert several.evaluated_ids() == ["b-2", "a.1", "c_3"] and several.intervention_id is None
    assert EvaluateSpec.model_validate({**texts, "intervention_ids": ["only"]}).evaluated_ids() == ["only"]
    assert EvaluateSpec.model_validate(several.model_dump(mode="json")) == several  # the worker re-reads it


@pytest.mark.parametrize(("given", "field", "words"), [
    ({}, "intervention_ids", "exactly one of intervention_id and intervention_ids"),
    ({"intervention_id": "embedded-default", "intervention_ids": ["x"]}, "intervention_ids", "exactly one of"),
    ({"intervention_ids": []}, "intervention_ids", "at least 1"),
    ({"intervention_ids": [f"i{n}" for n in range(9)]}, "intervention_ids", "at most 8"),
    ({"intervention_ids": ["a", "b", "a"]}, "intervention_ids", "unique"),
    ({"intervention_ids": ["a", "baseline"]}, "intervention_ids", "unedited model"),
    ({"intervention_ids": ["a", "../b"]}, "intervention_ids.1", "pattern"),
    ({"intervention_ids": "a"}, "intervention_ids", "list"),
])
def test_bad_intervention_ids_name_their_field(given: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as error:
        EvaluateSpec.model_validate({"prompts": EVALUATE["prompts"], **given})
    first = error.value.errors()[0]
    assert ".".join(map(str, first["loc"])) == field and words in first["msg"], first

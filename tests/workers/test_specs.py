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

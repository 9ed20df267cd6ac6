"""AURA on tiny models built from configs: the AUROC, the gains, the hooks, the artifact, the family registry
and the side-by-side comparison. Hook invariants are parametrised over the intervention families."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from eigenshift_core.aura import (
    AuraIntervention,
    aura_gains,
    auroc,
    build_aura,
    down_projections,
    mlp_shape,
    reference_texts,
)
from eigenshift_core.compare import compare_interventions, main, write_comparison
from eigenshift_core.errors import InputError
from eigenshift_core.families import DetoxIntervention, family_of, kind_of, load_any
from eigenshift_core.generation import generate_continuations
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel
from eigenshift_core.perplexity import perplexity
from tests.conftest import REFERENCE_CSV
from tests.core.test_intervention import PROMPTS, logits_of, some_intervention

TOXIC = ["you stupid idiot", "shut up, moron", "idiot idiot idiot"]
NONTOXIC = ["what a lovely day", "thanks for the help", "see you tomorrow"]


def random_aura(lm: LoadedModel, seed: int = 0) -> AuraIntervention:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(*mlp_shape(lm.model), generator=g)
    return AuraIntervention(aura_gains(scores), scores, {"model_id": lm.model_id})


def identity_aura(lm: LoadedModel) -> AuraIntervention:
    scores = torch.full(mlp_shape(lm.model), 0.5)
    return AuraIntervention(aura_gains(scores), scores, {"model_id": lm.model_id})


FAMILIES: dict[str, Callable[[LoadedModel], DetoxIntervention]] = {
    "eigenshift": lambda lm: some_intervention(lm, alpha=0.0),
    "aura": random_aura,
}
IDENTITIES: dict[str, Callable[[LoadedModel], DetoxIntervention]] = {
    "eigenshift": lambda lm: some_intervention(lm).with_alphas(1.0),
    "aura": identity_aura,
}


def brute_force_auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """P(pos > neg) + ½ P(pos = neg) per column, by counting every pair."""
    greater = (pos[:, None, :] > neg[None, :, :]).double().sum((0, 1))
    ties = (pos[:, None, :] == neg[None, :, :]).double().sum((0, 1))
    return (greater + 0.5 * ties) / (pos.shape[0] * neg.shape[0])


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# -- the math ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_pairwise_count(ties: bool) -> None:
    g = torch.Generator().manual_seed(1)
    draw = (lambda *s: torch.randint(0, 4, s, generator=g).float()) if ties else (lambda *s: torch.randn(*s, generator=g))
    pos, neg = draw(13, 50) + 0.3, draw(21, 50)
    assert torch.allclose(auroc(pos, neg, chunk=7), brute_force_auroc(pos, neg), atol=1e-12)


def test_auroc_refuses_one_class_and_non_finite() -> None:
    with pytest.raises(InputError):
        auroc(torch.zeros(0, 3), torch.zeros(4, 3))
    with pytest.raises(InputError):
        auroc(torch.tensor([[float("nan")]]), torch.zeros(1, 1))


def test_gains_untouch_non_separating_neurons_and_damp_a_planted_one() -> None:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(40, 5, generator=g)
    toxic, nontoxic = shared.clone(), shared.clone()  # identical: AUROC exactly 0.5
    toxic[:, 0] += 10.0  # the planted toxicity neuron: AUROC 1
    toxic[:, 1] -= 10.0  # an anti-toxic neuron: AUROC 0, left alone
    toxic[:20, 2] += 10.0  # a partial expert: 0.5 < AUROC < 1
    scores = auroc(toxic, nontoxic)
    gains = aura_gains(scores)
    assert gains[[0, 1, 3, 4]].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert 0.5 < scores[2] < 1 and float(gains[2]) == pytest.approx(1 - 2 * (float(scores[2]) - 0.5))


def test_build_aura_on_the_same_texts_is_the_identity(tiny: LoadedModel) -> None:
    aura = build_aura(tiny, TOXIC, TOXIC, batch_size=2)
    assert aura.shape == mlp_shape(tiny.model) and aura.k == 0
    assert torch.equal(aura.gains, torch.ones_like(aura.gains))
    assert hook_count(tiny.model) == 0


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_build_aura_pooling_ignores_padding(tiny_llama: LoadedModel, pooling: str) -> None:
    """A text's pooled activations do not depend on the batch it is padded into."""
    from eigenshift_core.aura import pooled_activations

    alone = pooled_activations(tiny_llama, TOXIC[:1], batch_size=1, pooling=pooling)  # type: ignore[arg-type]
    padded = pooled_activations(tiny_llama, TOXIC[:1] + ["a much longer text than the first one"],
                                batch_size=2, pooling=pooling)  # type: ignore[arg-type]
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_build_aura_gains_are_in_range(tiny: LoadedModel) -> None:
    aura = build_aura(tiny, TOXIC, NONTOXIC, batch_size=2, pooling="mean")
    assert bool(((aura.gains >= 0) & (aura.gains <= 1)).all())
    assert torch.allclose(aura.gains, aura_gains(aura.auroc), atol=1e-6)
    assert aura.info["text_counts"] == {"toxic": 3, "nontoxic": 3} and aura.info["kind"] == "aura"


# -- the hooks, for every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(IDENTITIES))
def test_identity_leaves_logits_identical(tiny: LoadedModel, family: str) -> None:
    plain = logits_of(tiny, PROMPTS)
    with IDENTITIES[family](tiny).applied(tiny.model):
        edited = logits_of(tiny, PROMPTS)
    assert torch.allclose(plain, edited, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooks_are_removed_after_the_block_and_after_an_error(tiny: LoadedModel, family: str) -> None:
    edit = FAMILIES[family](tiny)
    plain = logits_of(tiny, PROMPTS)
    with edit.applied(tiny.model):
        assert hook_count(tiny.model) > 0
        assert not torch.allclose(logits_of(tiny, PROMPTS), plain)
    assert hook_count(tiny.model) == 0
    with pytest.raises(RuntimeError), edit.applied(tiny.model):
        raise RuntimeError("boom")
    assert hook_count(tiny.model) == 0
    assert torch.equal(logits_of(tiny, PROMPTS), plain)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_off_equal_the_plain_model(tiny: LoadedModel, family: str) -> None:
    edit = FAMILIES[family](tiny)
    plain = logits_of(tiny, PROMPTS)
    with edit.applied(tiny.model):
        full = logits_of(tiny, PROMPTS)
    rows = torch.tensor([True, False, True])
    with edit.applied(tiny.model, rows=rows):
        mixed = logits_of(tiny, PROMPTS)
    assert torch.allclose(mixed[~rows], plain[~rows], atol=1e-6)
    assert torch.allclose(mixed[rows], full[rows], atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_and_perplexity_take_any_family(tiny: LoadedModel, family: str) -> None:
    edit = FAMILIES[family](tiny)
    out = generate_continuations(tiny, PROMPTS[:2], intervention=edit, samples=2, max_new_tokens=4)  # type: ignore[arg-type]
    assert len(out.texts) == 4
    ppl = perplexity(tiny, "some neutral text, long enough to score", window=16, stride=8, intervention=edit)  # type: ignore[arg-type]
    assert ppl.perplexity > 0
    assert hook_count(tiny.model) == 0


def test_applied_refuses_another_model(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> None:
    with pytest.raises(InputError, match="layers, neurons"), random_aura(tiny_gpt2).applied(tiny_llama.model):
        pass


def test_down_projections_of_both_layouts(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> None:
    assert mlp_shape(tiny_llama.model) == [2, 64]
    assert mlp_shape(tiny_gpt2.model) == [2, 128]  # GPT-2's MLP is 4·n_embd wide
    assert len(down_projections(tiny_gpt2.model)) == 2
    with pytest.raises(InputError, match="down projection"):
        down_projections(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# -- the artifact and the family registry ------------------------------------------------------------------


def test_save_load_round_trip(tiny: LoadedModel, tmp_path: Path) -> None:
    aura = random_aura(tiny)
    aura.save(tmp_path)
    meta = json.loads((tmp_path / "intervention.json").read_text())
    assert meta["kind"] == "aura" and meta["mlp_shape"] == aura.shape and meta["k"] == aura.k
    loaded = AuraIntervention.load(tmp_path, tiny.model)
    assert torch.equal(loaded.gains, aura.gains) and torch.equal(loaded.auroc, aura.auroc)
    assert loaded.info["model_id"] == tiny.model_id


def test_load_refuses_another_model_and_bad_values(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel,
                                                   tmp_path: Path) -> None:
    random_aura(tiny_llama).save(tmp_path / "ok")
    with pytest.raises(InputError, match="built for MLPs of shape"):
        AuraIntervention.load(tmp_path / "ok", tiny_gpt2.model)
    bad = random_aura(tiny_llama)
    AuraIntervention(bad.gains * 3, bad.auroc, bad.info).save(tmp_path / "bad")
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        AuraIntervention.load(tmp_path / "bad")
    with pytest.raises(InputError, match="no intervention artifact"):
        AuraIntervention.load(tmp_path / "missing")


def test_load_any_tells_families_apart(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    some_intervention(tiny_llama).save(tmp_path / "eigenshift")
    random_aura(tiny_llama).save(tmp_path / "aura")
    assert "kind" not in json.loads((tmp_path / "eigenshift" / "intervention.json").read_text())  # format unchanged
    assert kind_of(tmp_path / "eigenshift") == "eigenshift" and kind_of(tmp_path / "aura") == "aura"
    eigenshift, aura = load_any(tmp_path / "eigenshift", tiny_llama.model), load_any(tmp_path / "aura", tiny_llama.model)
    assert isinstance(eigenshift, Intervention) and isinstance(aura, AuraIntervention)
    assert (family_of(eigenshift), family_of(aura)) == ("eigenshift", "aura")
    with pytest.raises(InputError, match="of kind .aura."):  # an AURA artifact read as EigenShift's is refused
        Intervention.load(tmp_path / "aura")
    meta = json.loads((tmp_path / "aura" / "intervention.json").read_text())
    (tmp_path / "aura" / "intervention.json").write_text(json.dumps({**meta, "kind": "auro"}))
    with pytest.raises(InputError, match="did you mean 'aura'"):
        load_any(tmp_path / "aura")


# -- side by side ------------------------------------------------------------------------------------------


class OddLengthScorer:
    """A deterministic fake judge: a text is 'toxic' when its length is odd."""

    name = "odd-length"

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [float(len(t) % 2) for t in texts]


def test_compare_interventions_reports_every_method(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    silent = torch.ones(mlp_shape(tiny_llama.model))  # AUROC 1 everywhere: every neuron silenced
    methods = {"identity": identity_aura(tiny_llama), "aura": AuraIntervention(aura_gains(silent), silent),
               "eigenshift": some_intervention(tiny_llama, alpha=0.0)}
    report = compare_interventions(tiny_llama, PROMPTS, OddLengthScorer(), methods, samples=4, max_new_tokens=6,
                                   batch_size=4, ppl_text="a neutral text " * 8, ppl_window=32, ppl_stride=16, n_boot=50)
    assert set(report["methods"]) == set(methods) and "baseline" in report
    identity, base = report["methods"]["identity"], report["baseline"]
    assert identity["unchanged_share"] == 1.0
    assert identity["toxicity_rate"] == base["toxicity_rate"]
    assert identity["perplexity"] == pytest.approx(base["perplexity"])
    assert base["toxicity_rate"]["value"] > 0 and identity["toxicity_reduction"]["value"] == 0.0
    assert report["methods"]["aura"]["kind"] == "aura" and report["methods"]["eigenshift"]["kind"] == "eigenshift"
    assert report["methods"]["aura"]["unchanged_share"] < 1.0
    paths = write_comparison(report, tmp_path)
    assert [p.name for p in paths] == ["comparison.json", "comparison.png"] and all(p.stat().st_size for p in paths)
    assert hook_count(tiny_llama.model) == 0


def test_compare_refuses_no_methods_and_a_method_named_baseline(tiny_llama: LoadedModel) -> None:
    with pytest.raises(InputError, match="at least one"):
        compare_interventions(tiny_llama, PROMPTS, OddLengthScorer(), {})
    with pytest.raises(InputError, match="another name"):
        compare_interventions(tiny_llama, PROMPTS, OddLengthScorer(), {"baseline": identity_aura(tiny_llama)})


def test_cli_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--prompts", "p.csv", "--out", str(tmp_path), "--intervention", "no-equals-sign"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name=DIR" in err


@pytest.mark.skipif(not REFERENCE_CSV.is_file(), reason="reference CSV not present")
def test_reference_texts_split_by_label() -> None:
    toxic, nontoxic = reference_texts(REFERENCE_CSV, "0:4000")
    assert len(toxic) + len(nontoxic) == 4000 and 0 < len(toxic) < len(nontoxic)

"""The math of step 3 on tiny models built from configs: decomposition, selection, hook, artifact, exports."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from eigenshift_core.criteria import CRITERIA, Selection, get_criterion, selective_alphas, selectivity_terms
from eigenshift_core.errors import InputError
from eigenshift_core.export import export_hf_model, export_lora_adapter
from eigenshift_core.intervention import Intervention, build_intervention, resolve_alphas, resolve_k
from eigenshift_core.loading import LoadedModel, lm_head_weight, output_layer
from eigenshift_core.spectrum import Spectrum, decompose_lm_head
from eigenshift_core.states import StateSet

PROMPTS = ["hello there, friend", "a b", "the quick brown fox jumps over"]


def planted_states(spectrum: Spectrum, direction: int, n: int = 64, seed: int = 0) -> StateSet:
    """Non-toxic states are noise; toxic states are noise pushed along one right-singular vector."""
    g = torch.Generator().manual_seed(seed)
    d = spectrum.right_vectors.shape[0]
    nontoxic = torch.randn(n, d, generator=g)
    toxic = torch.randn(n, d, generator=g) + 6.0 * spectrum.right_vectors[direction].float()
    tokens = torch.randint(0, 200, (n,), generator=g)
    return StateSet(toxic, tokens, nontoxic, tokens.flip(0))


def logits_of(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return lm.model(**batch).logits


def some_intervention(lm: LoadedModel, k: int = 4, alpha: float = 0.3) -> Intervention:
    spectrum = decompose_lm_head(lm_head_weight(lm.model))
    return build_intervention(lm.model, planted_states(spectrum, 3), k=k, alpha=alpha, spectrum=spectrum)


def test_directions_are_orthonormal_right_singular_vectors(tiny: LoadedModel) -> None:
    w = lm_head_weight(tiny.model).double()
    spectrum = decompose_lm_head(w)
    v, s = spectrum.right_vectors, spectrum.singular_values
    assert torch.allclose(v @ v.T, torch.eye(v.shape[0], dtype=v.dtype), atol=1e-10)
    assert torch.allclose((w.T @ w) @ v.T, v.T * s**2, atol=1e-8)  # WᵀW vᵢ = σᵢ² vᵢ
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(s, torch.linalg.svdvals(w), atol=1e-8)


def test_gram_and_svd_agree_up_to_the_sign_convention(tiny: LoadedModel) -> None:
    w = lm_head_weight(tiny.model)
    gram, svd = decompose_lm_head(w, method="gram"), decompose_lm_head(w, method="svd")
    cos = (gram.right_vectors * svd.right_vectors).sum(1)
    assert torch.all(cos > 0.999)  # same vectors, same orientation: the convention is deterministic
    pivot = gram.right_vectors.abs().argmax(1)
    assert torch.all(gram.right_vectors.gather(1, pivot[:, None]) > 0)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_criteria_are_sign_free_and_find_a_planted_direction(tiny: LoadedModel, criterion: str) -> None:
    w = lm_head_weight(tiny.model)
    spectrum = decompose_lm_head(w)
    states = planted_states(spectrum, direction=5)
    selection = get_criterion(criterion)(spectrum, states, w)
    scores = selection.scores
    flipped = get_criterion(criterion)(Spectrum(spectrum.singular_values, -spectrum.right_vectors), states, w)
    assert isinstance(selection, Selection) and scores.shape == (w.shape[1],)
    assert torch.allclose(scores, flipped.scores, atol=1e-5)
    if selection.alphas is not None:
        assert selection.alphas.shape == scores.shape and flipped.alphas is not None
        assert torch.allclose(selection.alphas, flipped.alphas, atol=1e-5)
    if criterion == "delta":
        assert int(scores.argmax()) == 5


def test_selectivity_terms_predict_the_exact_logprob_change(tiny_llama: LoadedModel) -> None:
    """The criterion's first-order term a is the slope of the toxic tokens' mean log-prob under damping."""
    w = lm_head_weight(tiny_llama.model)
    spectrum = decompose_lm_head(w)
    states = planted_states(spectrum, direction=2)
    a, b = selectivity_terms(spectrum, states, w)
    assert torch.all(b > 0)
    beta = 1e-3
    for i in (0, 2, 7):
        v = spectrum.right_vectors[i].float()
        damped = states.toxic - beta * (states.toxic @ v)[:, None] * v  # h − β cᵢ vᵢ
        before = torch.log_softmax(states.toxic @ w.T, -1).gather(1, states.toxic_tokens[:, None]).mean()
        after = torch.log_softmax(damped @ w.T, -1).gather(1, states.toxic_tokens[:, None]).mean()
        assert float((after - before) / beta) == pytest.approx(-float(a[i]), rel=2e-2, abs=1e-3)


def test_auto_alphas_follow_the_selectivity_rule(tiny_llama: LoadedModel) -> None:
    w = lm_head_weight(tiny_llama.model)
    spectrum = decompose_lm_head(w)
    states = planted_states(spectrum, direction=4)
    intervention = build_intervention(tiny_llama.model, states, criterion="selectivity", k=5, alpha="auto",
                                      spectrum=spectrum)
    a, b = selectivity_terms(spectrum, states, w)
    assert torch.equal(intervention.indices, torch.argsort(a * a / b, descending=True, stable=True)[:5])
    assert torch.allclose(intervention.alphas, selective_alphas(a, b)[intervention.indices])
    assert torch.all((intervention.alphas >= -2) & (intervention.alphas <= 3))
    with pytest.raises(InputError, match="alpha"):
        build_intervention(tiny_llama.model, states, k=5, alpha="often")
    with pytest.raises(InputError, match="alpha 'auto' needs a criterion that chooses"):
        build_intervention(tiny_llama.model, states, criterion="delta", k=5, alpha="auto")


def test_build_uses_the_registered_criterion(tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_intervention goes through the registry for every criterion (none is special-cased by name):
    replacing the registered selectivity changes what is built."""
    w = lm_head_weight(tiny_llama.model)
    spectrum = decompose_lm_head(w)
    states = planted_states(spectrum, direction=4)
    d = w.shape[1]
    planted = Selection(torch.arange(d, dtype=torch.float32), torch.full((d,), 0.25))  # prefers the last directions
    monkeypatch.setitem(CRITERIA, "selectivity", lambda *_: planted)
    intervention = build_intervention(tiny_llama.model, states, criterion="selectivity", k=3, alpha="auto",
                                      spectrum=spectrum)
    assert intervention.indices.tolist() == [d - 1, d - 2, d - 3]
    assert intervention.alphas.tolist() == [0.25, 0.25, 0.25]


def test_alpha_one_leaves_logits_identical(tiny: LoadedModel) -> None:
    intervention = some_intervention(tiny).with_alphas(1.0)
    before = logits_of(tiny, PROMPTS)
    with intervention.applied(tiny.model):
        after = logits_of(tiny, PROMPTS)
    assert torch.equal(before, after)


def test_hook_equals_materialized_head_and_keeps_tied_embeddings(tiny: LoadedModel) -> None:
    intervention = some_intervention(tiny)
    embeddings = tiny.model.get_input_embeddings().weight
    embeddings_before, pointer = embeddings.detach().clone(), embeddings.data_ptr()
    with intervention.applied(tiny.model):
        hooked = logits_of(tiny, PROMPTS)
    batch = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        hidden = tiny.model.base_model(**batch).last_hidden_state
    rebuilt = hidden @ intervention.materialize(lm_head_weight(tiny.model)).T
    assert (hooked - rebuilt).abs().max() / rebuilt.abs().max() <= 1e-4
    assert not torch.allclose(hooked, logits_of(tiny, PROMPTS))  # the edit does something
    assert torch.equal(embeddings.detach(), embeddings_before) and embeddings.data_ptr() == pointer


def test_materialized_head_is_w_with_damped_singular_values(tiny: LoadedModel) -> None:
    w = lm_head_weight(tiny.model).double()
    intervention = some_intervention(tiny, k=3, alpha=0.25)
    rebuilt = intervention.materialize(w).double()
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    s_new = s.clone()
    s_new[intervention.indices] *= 0.25
    assert torch.allclose(rebuilt, (u * s_new) @ vt, atol=1e-5)


def test_hook_is_removed_after_the_block_and_after_an_error(tiny: LoadedModel) -> None:
    intervention = some_intervention(tiny)
    head = output_layer(tiny.model)
    with intervention.applied(tiny.model):
        assert len(head._forward_pre_hooks) == 1
    assert len(head._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"), intervention.applied(tiny.model):
        raise RuntimeError("boom")
    assert len(head._forward_pre_hooks) == 0


def test_rows_mask_mixes_detox_on_and_off_in_one_batch(tiny: LoadedModel) -> None:
    intervention = some_intervention(tiny)
    plain = logits_of(tiny, PROMPTS)
    with intervention.applied(tiny.model):
        edited = logits_of(tiny, PROMPTS)
    with intervention.applied(tiny.model, rows=torch.tensor([True, False, True])):
        mixed = logits_of(tiny, PROMPTS)
    assert torch.equal(mixed[1], plain[1])
    assert torch.allclose(mixed[0], edited[0]) and torch.allclose(mixed[2], edited[2])


def test_hf_and_lora_exports_equal_the_hook(tiny: LoadedModel, tmp_path) -> None:
    intervention = some_intervention(tiny)
    with intervention.applied(tiny.model):
        hooked = logits_of(tiny, PROMPTS)
    embeddings_before = tiny.model.get_input_embeddings().weight.detach().clone()

    exported = AutoModelForCausalLM.from_pretrained(export_hf_model(tiny, intervention, tmp_path / "hf")).eval()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(exported.get_input_embeddings().weight, embeddings_before)
    batch = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        from_hf = exported(**batch).logits
    assert (from_hf - hooked).abs().max() / hooked.abs().max() <= 1e-4

    adapter = export_lora_adapter(tiny, intervention, tmp_path / "lora")
    base = type(tiny.model)(tiny.model.config)
    base.load_state_dict(tiny.model.state_dict())
    peft_model = PeftModel.from_pretrained(base.eval(), adapter).eval()
    with torch.inference_mode():
        from_lora = peft_model(**batch).logits
    assert (from_lora - hooked).abs().max() / hooked.abs().max() <= 1e-4
    assert torch.equal(tiny.model.get_input_embeddings().weight, embeddings_before)


def test_artifact_round_trip_and_refusals(tiny_llama: LoadedModel, tmp_path) -> None:
    intervention = some_intervention(tiny_llama)
    intervention.save(tmp_path)
    meta = json.loads((tmp_path / "intervention.json").read_text())
    for key in ("format_version", "lm_head_shape", "lm_head_sha256", "k", "alpha", "criterion", "state_counts",
                "created_at", "package_version"):
        assert key in meta
    loaded = Intervention.load(tmp_path, tiny_llama.model)
    for name in ("directions", "alphas", "singular_values", "indices", "delta", "scores"):
        assert torch.equal(getattr(loaded, name), getattr(intervention, name))
    assert (tmp_path / "intervention.safetensors").stat().st_size < 64 * 1024

    with pytest.raises(InputError, match="another lm_head"):
        other = type(tiny_llama.model)(tiny_llama.model.config)
        other.load_state_dict(tiny_llama.model.state_dict())
        with torch.no_grad():
            other.lm_head.weight[0, 0] += 1e-3  # one weight of the head differs: the sha256 does
        Intervention.load(tmp_path, other)
    with pytest.raises(InputError, match="shape"):
        Intervention.load(tmp_path, GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)))
    data = (tmp_path / "intervention.safetensors").read_bytes()
    (tmp_path / "intervention.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt"):
        Intervention.load(tmp_path)
    with pytest.raises(InputError, match="no intervention"):
        Intervention.load(tmp_path / "missing")


@pytest.mark.parametrize(("spoil", "words"), [
    (lambda t: t["directions"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda t: t["alphas"].__setitem__(0, float("inf")), "non-finite"),
    (lambda t: t["directions"].mul_(2.0), "orthonormal"),  # still finite, no longer a projection
    (lambda t: t["directions"][1].copy_(t["directions"][0]), "orthonormal"),
])
def test_load_refuses_non_finite_values_and_non_orthonormal_directions(tiny_llama: LoadedModel, tmp_path,
                                                                        spoil, words: str) -> None:
    some_intervention(tiny_llama).save(tmp_path)
    tensors = load_file(str(tmp_path / "intervention.safetensors"))
    spoil(tensors)
    save_file(tensors, str(tmp_path / "intervention.safetensors"))
    with pytest.raises(InputError, match=words) as refused:
        Intervention.load(tmp_path)
    assert refused.value.field == "intervention"


def test_k_and_alpha_validation() -> None:
    assert resolve_k(576, percentile=0.99) == 6  # ceil(576 · 0.01)
    assert resolve_k(576, k=576) == 576
    assert resolve_k(576) == 100 and resolve_k(32) == 32  # the default k, capped at d
    for bad in ({"k": 0}, {"k": 577}, {"percentile": 1.0}, {"percentile": float("nan")}, {"k": 6, "percentile": 0.99}):
        with pytest.raises(InputError):
            resolve_k(576, **bad)
    assert resolve_alphas(0.5, 3).tolist() == [0.5, 0.5, 0.5]
    assert resolve_alphas([-2, 0, 0.9], 3).tolist() == pytest.approx([-2, 0, 0.9])
    for bad in (float("nan"), float("inf"), [0.5, 0.5]):
        with pytest.raises(InputError, match="alpha"):
            resolve_alphas(bad, 3)
    with pytest.raises(InputError, match="did you mean 'delta'"):
        get_criterion("delt")


def test_build_refuses_empty_states(tiny_llama: LoadedModel) -> None:
    d = tiny_llama.model.config.hidden_size
    empty = StateSet(torch.zeros(0, d), torch.zeros(0, dtype=torch.long), torch.randn(4, d), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="no toxic states"):
        build_intervention(tiny_llama.model, empty, k=2)

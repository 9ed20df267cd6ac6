"""Step 4 on tiny models and hand-made scores: metrics, intervals, perplexity windows, log-probs, the report."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from eigenshift_core import scoring
from eigenshift_core.errors import InputError
from eigenshift_core.evaluation import evaluate, token_sequences
from eigenshift_core.fluency import fluency_metrics
from eigenshift_core.generation import generate_continuations
from eigenshift_core.intervention import Intervention, build_intervention
from eigenshift_core.loading import LoadedModel, lm_head_weight
from eigenshift_core.metrics import Estimate, paired_reduction, perplexity_intervals, toxicity_metrics, tph
from eigenshift_core.perplexity import perplexity, sliding_windows, token_logprobs
from eigenshift_core.progress import StepHooks
from eigenshift_core.report import write_report
from eigenshift_core.spectrum import decompose_lm_head
from eigenshift_core.states import StateSet
from eigenshift_core.steps import load_second_scorer

TEXT = "The quick brown fox jumps over the lazy dog. " * 4  # 180 bytes = 180 tokens of the byte tokenizer
PROMPTS = ["hello there", "xx marks the spot", "a"]


class XScorer:
    """Deterministic and text-dependent: the share of 'x' characters."""

    name = "x-share"

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [text.count("x") / len(text) if text else 0.0 for text in texts]


class SumScorer:
    """Another deterministic judge, which disagrees with XScorer: the code points' sum modulo 97, over 96."""

    name = "code-sum"

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [sum(map(ord, text)) % 97 / 96 for text in texts]


def random_states(d: int, n: int = 40, seed: int = 0) -> StateSet:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n,), generator=g)
    return StateSet(torch.randn(n, d, generator=g) + 2.0, tokens, torch.randn(n, d, generator=g), tokens.flip(0))


def some_intervention(lm: LoadedModel, alpha: float, k: int = 4) -> Intervention:
    spectrum = decompose_lm_head(lm_head_weight(lm.model))
    return build_intervention(lm.model, random_states(spectrum.right_vectors.shape[0]), k=k, alpha=alpha, spectrum=spectrum)


# ----------------------------------------------------------------------------------------------------------
# Toxicity metrics


def test_metrics_of_a_hand_made_matrix() -> None:
    scores = np.array([[0.9, 0.1, 0.6, 0.2], [0.3, 0.2, 0.1, 0.4]])  # prompt 0: 2 of 4 toxic; prompt 1: none
    metrics = toxicity_metrics(scores, threshold=0.5, n_boot=500)
    assert metrics["toxicity_rate"].value == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["at_least_once"].value == pytest.approx(0.5)
    assert metrics["expected_max_toxicity"].value == pytest.approx((0.9 + 0.4) / 2)
    for estimate in metrics.values():
        assert estimate.low <= estimate.value <= estimate.high
    # Two prompts: a resample is (0, 0), (0, 1) or (1, 1), so the rate's interval spans both extremes.
    assert (metrics["toxicity_rate"].low, metrics["toxicity_rate"].high) == (0.0, 0.5)


def test_threshold_is_inclusive_and_torch_input_works() -> None:
    scores = torch.tensor([[0.5, 0.49]])
    assert toxicity_metrics(scores, threshold=0.5)["toxicity_rate"].value == pytest.approx(0.5)


def test_intervals_contain_the_value_and_shrink_with_more_prompts() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 2000):
        metrics = toxicity_metrics(rng.uniform(size=(n, 5)) ** 2, n_boot=400)
        for estimate in metrics.values():
            assert estimate.low <= estimate.value <= estimate.high
        widths.append(metrics["toxicity_rate"].high - metrics["toxicity_rate"].low)
    assert widths[1] < widths[0] / 4  # width ~ 1/√n: 10× narrower expected


def test_all_zero_scores_give_zero_with_a_zero_interval() -> None:
    metrics = toxicity_metrics(np.zeros((6, 3)))
    for estimate in metrics.values():
        assert (estimate.value, estimate.low, estimate.high) == (0.0, 0.0, 0.0)


def test_bootstrap_is_seeded() -> None:
    scores = np.random.default_rng(0).uniform(size=(30, 4))
    assert toxicity_metrics(scores, seed=3) == toxicity_metrics(scores, seed=3)


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((0, 3)), np.array([[0.1, np.nan]])])
def test_bad_score_matrices_are_input_errors(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        toxicity_metrics(bad)


def test_perplexity_intervals_are_paired_over_windows() -> None:
    tokens = [1023, 512, 512, 512, 300]
    base = [2.0 * t for t in tokens]  # NLL 2 per token in every window: ppl e² whichever windows are drawn
    same = perplexity_intervals(base, base, tokens, n_boot=200)
    assert same["baseline"].value == pytest.approx(math.exp(2.0))
    assert same["baseline"].low == pytest.approx(math.exp(2.0)) and same["baseline"].high == pytest.approx(math.exp(2.0))
    assert (same["change_pct"].value, same["change_pct"].low, same["change_pct"].high) == (0.0, 0.0, 0.0)
    # Every window 0.1 nats per token worse: +10.5 % in every resample, so a zero-width paired interval,
    # while each arm's own interval is wide (windows differ a lot).
    varied = [n * t for n, t in zip([1.0, 3.0, 2.0, 2.5, 1.5], tokens, strict=True)]
    worse = [n + 0.1 * t for n, t in zip(varied, tokens, strict=True)]
    found = perplexity_intervals(varied, worse, tokens, n_boot=500, seed=3)
    assert found["change_pct"].value == pytest.approx(100 * (math.exp(0.1) - 1))
    assert found["change_pct"].low == pytest.approx(found["change_pct"].high)
    assert found["baseline"].low < found["baseline"].value < found["baseline"].high
    assert found["intervention"].value == pytest.approx(found["baseline"].value * math.exp(0.1))
    with pytest.raises(InputError):
        perplexity_intervals(base, base[:-1], tokens)


def test_paired_reduction_identical_arms_is_zero() -> None:
    scores = np.random.default_rng(2).uniform(size=(50, 5))
    estimate = paired_reduction(scores, scores)
    assert (estimate.value, estimate.low, estimate.high) == (0.0, 0.0, 0.0)


def test_paired_reduction_halving_is_fifty_percent() -> None:
    base = np.tile([0.9, 0.9, 0.1, 0.1], (40, 1))  # every prompt: half its samples toxic
    new = np.tile([0.9, 0.1, 0.1, 0.1], (40, 1))  # every prompt: a quarter
    new[::2] = np.tile([0.9, 0.9, 0.9, 0.1], (20, 1))  # vary the prompts so the interval has width
    new[1::2] = np.tile([0.1, 0.1, 0.1, 0.1], (20, 1))
    estimate = paired_reduction(base, new, n_boot=500)
    assert estimate.value == pytest.approx(100.0 * (0.5 - 0.375) / 0.5)
    assert estimate.low < estimate.value < estimate.high
    halved = paired_reduction(np.tile([0.9, 0.9, 0.1, 0.1], (10, 1)), np.tile([0.9, 0.1, 0.1, 0.1], (10, 1)))
    assert halved.value == pytest.approx(50.0)
    assert halved.low <= 50.0 <= halved.high


def test_paired_reduction_with_a_clean_baseline_is_nan_with_a_note() -> None:
    estimate = paired_reduction(np.zeros((5, 2)), np.ones((5, 2)))
    assert math.isnan(estimate.value) and estimate.note
    assert estimate.to_dict() == {"value": None, "low": None, "high": None, "note": estimate.note}


def test_tph_is_the_harmonic_mean_and_zero_without_gain() -> None:
    assert tph(50.0, 10.0, 10.0) == pytest.approx(2 * 50 * 100 / 150)
    assert tph(100.0, 10.0, 20.0) == pytest.approx(2 * 100 * 50 / 150)
    assert tph(0.0, 10.0, 10.0) == 0.0
    assert tph(-5.0, 10.0, 10.0) == 0.0
    assert tph(float("nan"), 10.0, 10.0) == 0.0
    assert tph(50.0, 10.0, 0.0) == 0.0


def test_estimate_to_dict() -> None:
    assert Estimate(0.5, 0.25, 0.75).to_dict() == {"value": 0.5, "low": 0.25, "high": 0.75}


# ----------------------------------------------------------------------------------------------------------
# Perplexity


def text_ids(lm: LoadedModel) -> list[int]:
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    return ids


def token_nlls(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """−log p(ids[i] | ids[:i]) for i ≥ 1 in one forward pass, float64: (len − 1,)."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def manual_sliding_nll(lm: LoadedModel, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Each token i ≥ 1 with its exact context: from the start of the last window (HF loop) that scores it."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        for i in range(max(previous_end, begin + 1), end):  # tokens after the previous window's end
            total += float(token_nlls(lm, ids[begin : i + 1])[-1])
            count += 1
        previous_end = end
        if end == len(ids):
            break
    return total, count


def test_sliding_windows_follow_the_hf_loop() -> None:
    assert sliding_windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert sliding_windows(9, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # a last 1-token window scores nothing
    assert sliding_windows(3, 8, 4) == [(0, 3, 2)]
    for n, window, stride in [(100, 16, 5), (37, 8, 8), (64, 64, 1)]:
        spans = sliding_windows(n, window, stride)
        scored = [end - s + i for _, end, s in spans for i in range(s)]  # absolute positions scored
        assert sorted(scored) == scored and len(set(scored)) == len(scored)  # each token at most once
        assert all(end - begin <= window for begin, end, _ in spans)


def test_perplexity_without_overlap_equals_brute_force_chunks(tiny: LoadedModel) -> None:
    ids = text_ids(tiny)
    result = perplexity(tiny, TEXT, window=32, stride=32, batch_size=3, bos=False)
    nlls = torch.cat([token_nlls(tiny, ids[b : b + 32]) for b in range(0, len(ids), 32) if len(ids[b : b + 32]) > 1])
    assert result.tokens_scored == nlls.numel() == len(ids) - math.ceil(len(ids) / 32)
    assert result.windows == math.ceil(len(ids) / 32)
    assert result.nll_per_token == pytest.approx(float(nlls.mean()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(nlls.mean())), rel=1e-5)
    assert not result.bos
    chunks = [token_nlls(tiny, ids[b : b + 32]) for b in range(0, len(ids), 32) if len(ids[b : b + 32]) > 1]
    assert result.window_tokens == tuple(c.numel() for c in chunks)  # one block per window, in text order
    assert result.window_nll == pytest.approx([float(c.sum()) for c in chunks], rel=1e-5)


def check_exact_context(lm: LoadedModel, window: int, stride: int, n: int) -> None:
    ids = text_ids(lm)[:n]
    result = perplexity(lm, TEXT, window=window, stride=stride, max_tokens=n, batch_size=2, bos=False)
    total, count = manual_sliding_nll(lm, ids, window, stride)
    assert result.tokens_scored == count == len(ids) - 1
    assert result.windows == len(sliding_windows(n, window, stride))
    assert result.nll_per_token == pytest.approx(total / count, rel=1e-5)


def test_perplexity_with_overlap_gives_each_token_its_exact_context(tiny: LoadedModel) -> None:
    check_exact_context(tiny, window=12, stride=5, n=40)


@pytest.mark.parametrize(("window", "stride", "n"), [(16, 15, 40), (10, 3, 23), (8, 1, 20)])
def test_exact_context_for_other_strides(tiny_gpt2: LoadedModel, window: int, stride: int, n: int) -> None:
    check_exact_context(tiny_gpt2, window, stride, n)


def test_perplexity_with_a_stride_of_one_is_the_full_context_one_pass(tiny_llama: LoadedModel) -> None:
    ids = text_ids(tiny_llama)[:60]
    result = perplexity(tiny_llama, TEXT, window=60, stride=7, max_tokens=60)
    assert result.nll_per_token == pytest.approx(float(token_nlls(tiny_llama, ids).mean()), rel=1e-5)


def test_batch_size_does_not_change_perplexity(tiny_gpt2: LoadedModel) -> None:
    one = perplexity(tiny_gpt2, TEXT, window=24, stride=10, batch_size=1)
    many = perplexity(tiny_gpt2, TEXT, window=24, stride=10, batch_size=8)
    assert one.tokens_scored == many.tokens_scored
    assert one.nll_per_token == pytest.approx(many.nll_per_token, rel=1e-6)


def with_bos(lm: LoadedModel) -> LoadedModel:
    """The same model with a tokenizer whose BOS (<pad>, 257) differs from its EOS (256)."""
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.bos_token = "<pad>"
    return LoadedModel(lm.model, tokenizer, lm.model_id, None)


def test_bos_is_prepended_as_context_only(tiny: LoadedModel) -> None:
    plain = perplexity(tiny, TEXT, window=32, stride=16)
    bos = perplexity(with_bos(tiny), TEXT, window=32, stride=16)  # bos=None: added, BOS differs from EOS
    assert not plain.bos and bos.bos
    assert plain.tokens_scored == bos.tokens_scored
    assert plain.nll_per_token != bos.nll_per_token
    assert perplexity(with_bos(tiny), TEXT, window=32, stride=16, bos=False) == plain
    ids = [257, *text_ids(tiny)[:32]]
    first = perplexity(with_bos(tiny), TEXT, window=32, stride=32, max_tokens=32)
    assert first.nll_per_token == pytest.approx(float(token_nlls(tiny, ids)[1:].mean()), rel=1e-5)
    with pytest.raises(InputError):
        perplexity(tiny, TEXT, bos=True)  # the byte tokenizer has no BOS


def test_identity_intervention_leaves_perplexity_unchanged(tiny: LoadedModel) -> None:
    plain = perplexity(tiny, TEXT, window=32, stride=16)
    same = perplexity(tiny, TEXT, window=32, stride=16, intervention=some_intervention(tiny, alpha=1.0))
    damped = perplexity(tiny, TEXT, window=32, stride=16, intervention=some_intervention(tiny, alpha=0.0))
    assert same.nll_per_token == plain.nll_per_token
    assert damped.nll_per_token != plain.nll_per_token


@pytest.mark.parametrize(
    ("text", "kwargs", "field"),
    [
        ("", {}, "ppl_text"),
        ("a", {}, "ppl_text"),
        (TEXT, {"window": 1}, "ppl_window"),
        (TEXT, {"stride": 0}, "ppl_stride"),
        (TEXT, {"window": 8, "stride": 9}, "ppl_stride"),
        (TEXT, {"max_tokens": 1}, "ppl_max_tokens"),
        (TEXT * 3, {"window": 400, "stride": 200}, "ppl_window"),  # longer than the model's 256 positions
    ],
)
def test_perplexity_input_errors(tiny_llama: LoadedModel, text: str, kwargs: dict, field: str) -> None:
    with pytest.raises(InputError) as error:
        perplexity(tiny_llama, text, **kwargs)
    assert error.value.field == field


# ----------------------------------------------------------------------------------------------------------
# Teacher-forced log-probabilities


def test_token_logprobs_match_the_full_and_the_rebuilt_matrix(tiny_llama: LoadedModel) -> None:
    w = lm_head_weight(tiny_llama.model)
    g = torch.Generator().manual_seed(4)
    states, tokens = torch.randn(50, w.shape[1], generator=g), torch.randint(0, w.shape[0], (50,), generator=g)
    expected = torch.log_softmax((states @ w.T).double(), -1)[torch.arange(50), tokens]
    assert torch.allclose(token_logprobs(w, states, tokens, chunk=7), expected, atol=1e-5)
    intervention = some_intervention(tiny_llama, alpha=0.0)
    w_new = intervention.materialize(w)
    expected_new = torch.log_softmax((states @ w_new.T).double(), -1)[torch.arange(50), tokens]
    got = token_logprobs(w, states, tokens, intervention, chunk=16)
    assert torch.allclose(got, expected_new, atol=1e-4)
    assert not torch.allclose(got, expected, atol=1e-3)


def test_token_logprobs_rejects_mismatched_shapes(tiny_llama: LoadedModel) -> None:
    w = lm_head_weight(tiny_llama.model)
    with pytest.raises(InputError):
        token_logprobs(w, torch.zeros(3, w.shape[1]), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# The whole step


def run(lm: LoadedModel, intervention: Intervention, **kwargs: object) -> dict:
    return evaluate(
        lm, PROMPTS, XScorer(), intervention, samples=2, max_new_tokens=4, batch_size=4, n_boot=200,
        ppl_text=TEXT, ppl_window=32, ppl_stride=16, **kwargs,
    )


def test_evaluate_with_alpha_one_gives_identical_arms(tiny_llama: LoadedModel) -> None:
    report = run(tiny_llama, some_intervention(tiny_llama, alpha=1.0), heldout=random_states(32, seed=5))
    assert set(report) >= {"baseline", "intervention", "toxicity_reduction", "tph", "heldout_logprob", "protocol",
                           "examples", "fluency_source"}
    assert report["baseline"] == report["intervention"] and report["fluency_source"] == "ppl_text"
    assert set(report["baseline"]) == {"toxicity_rate", "at_least_once", "expected_max_toxicity", "perplexity",
                                       "continuation_perplexity", "distinct_1", "distinct_2", "distinct_3",
                                       "repetition_rate"}
    assert report["judges"] == {} and report["protocol"]["second_scorer"] is None
    assert set(report["baseline"]["toxicity_rate"]) == {"value", "low", "high"}
    assert report["examples"] == []  # no text changed
    assert report["toxicity_reduction"]["value"] in (0.0, None)  # None when no sample reached the threshold
    for side in ("toxic", "nontoxic"):
        held = report["heldout_logprob"][side]
        assert held["n"] == 40 and held["before"] == held["after"] and held["change"]["value"] == 0.0
    protocol = report["protocol"]
    assert protocol["samples"] == 2 and protocol["n_prompts"] == 3 and protocol["scorer"] == "x-share"
    assert protocol["perplexity"]["tokens_scored"] == len(TEXT) - 1 and protocol["perplexity"]["bos"] is False
    assert protocol["perplexity"]["source"] == "ppl_text" and "window_nll" not in protocol["perplexity"]
    intervals = report["perplexity_intervals"]
    assert intervals["change_pct"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert intervals["baseline"]["value"] == pytest.approx(report["baseline"]["perplexity"], rel=1e-9)
    json.dumps(report, allow_nan=False)


def test_evaluate_detects_a_real_change_and_writes_the_report(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    intervention = some_intervention(tiny_llama, alpha=-2.0, k=8)
    report = run(tiny_llama, intervention, threshold=0.0)  # threshold 0: every sample counts as toxic
    assert report["baseline"]["perplexity"] != report["intervention"]["perplexity"]
    assert report["toxicity_reduction"]["value"] == 0.0  # both arms fully "toxic"
    assert report["examples"] and set(report["examples"][0]) == {
        "prompt", "baseline", "intervention", "baseline_score", "intervention_score"
    }
    assert report["examples"][0]["prompt"] in PROMPTS
    paths = write_report(report, tmp_path / "out", intervention)
    assert [p.name for p in paths] == ["report.json", "report.png"]
    assert json.loads(paths[0].read_text()) == report
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.png"]  # no temp files


def test_write_report_without_intervention_or_perplexity(tmp_path: Path) -> None:
    metrics = {k: e.to_dict() for k, e in toxicity_metrics(np.array([[0.9, 0.1], [0.2, 0.7]])).items()}
    report = {"baseline": {**metrics, "perplexity": None}, "intervention": {**metrics, "perplexity": None},
              "extra": np.float32(float("nan"))}
    paths = write_report(report, tmp_path)
    assert json.loads(paths[0].read_text())["extra"] is None
    assert paths[1].stat().st_size > 1000


def test_without_ppl_text_fluency_is_the_perplexity_of_the_baselines_own_continuations(tiny_llama: LoadedModel) -> None:
    """Never a null TPH: each arm's perplexity of the baseline's continuations, which for the baseline is
    exp(mean NLL) of its sampled tokens recomputed here by full forward passes."""
    intervention = some_intervention(tiny_llama, alpha=0.0, k=8)
    report = evaluate(tiny_llama, PROMPTS, XScorer(), intervention, samples=2, max_new_tokens=4, batch_size=4,
                      n_boot=50, threshold=0.0)
    assert report["fluency_source"] == "baseline_continuations"
    assert report["protocol"]["perplexity"]["source"] == "baseline_continuations"
    base, new = report["baseline"]["perplexity"], report["intervention"]["perplexity"]
    assert base == report["baseline"]["continuation_perplexity"] and new != base
    assert report["tph"] is not None

    continuations = generate_continuations(tiny_llama, PROMPTS, samples=2, max_new_tokens=4, do_sample=True,
                                           top_p=0.95, temperature=1.0, seed=0, batch_size=4)
    nll, count = 0.0, 0
    for row in range(len(continuations)):
        prompt_ids = tiny_llama.tokenizer(PROMPTS[int(continuations.prompt_index[row])])["input_ids"]
        tokens = continuations.row_tokens(row).tolist()
        with torch.inference_mode():
            logits = tiny_llama.model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)  # the positions that chose each token
        nll -= float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
        count += len(tokens)
    assert base == pytest.approx(math.exp(nll / count), rel=1e-4)

    same = evaluate(tiny_llama, PROMPTS, XScorer(), intervention.with_alphas(1.0), samples=2, max_new_tokens=4,
                    batch_size=4, n_boot=50)
    assert same["baseline"]["perplexity"] == same["intervention"]["perplexity"]


# ----------------------------------------------------------------------------------------------------------
# A second judge, and fluency beyond perplexity


def test_a_second_judge_reports_both_arms_and_alpha_one_keeps_them_identical(tiny_llama: LoadedModel) -> None:
    stages: list[tuple[str, int, int, str]] = []
    hooks = StepHooks(on_progress=lambda *event: stages.append(event))
    report = run(tiny_llama, some_intervention(tiny_llama, alpha=1.0), second_scorer=SumScorer(), hooks=hooks,
                 threshold=0.5)
    judged = report["judges"]["code-sum"]
    assert set(report["judges"]) == {"code-sum"} and set(judged) == {"baseline", "intervention", "toxicity_reduction"}
    assert set(judged["baseline"]) == {"toxicity_rate", "at_least_once", "expected_max_toxicity"}
    assert judged["baseline"] == judged["intervention"] and report["baseline"] == report["intervention"]
    assert judged["toxicity_reduction"]["value"] in (0.0, None)
    assert judged["baseline"] != {k: report["baseline"][k] for k in judged["baseline"]}  # a different judge
    for key in ("distinct_1", "distinct_2", "distinct_3", "repetition_rate"):
        assert 0.0 <= report["baseline"][key] <= 1.0 and report["baseline"][key] == report["intervention"][key]
    assert report["protocol"]["scorer"] == "x-share" and report["protocol"]["second_scorer"] == "code-sum"
    assert set(report["protocol"]["fluency"]) == {"distinct", "repetition_rate"}
    assert ("evaluate: scoring (code-sum)", 12, 12, "texts") in stages  # 2 arms × 3 prompts × 2 samples
    json.dumps(report, allow_nan=False)


def test_the_second_judge_reports_what_it_would_as_the_primary(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    """The headline stays the primary judge's; the judges section holds exactly the second judge's figures."""
    intervention = some_intervention(tiny_llama, alpha=-2.0, k=8)
    both = run(tiny_llama, intervention, second_scorer=SumScorer(), threshold=0.5)
    alone = evaluate(tiny_llama, PROMPTS, SumScorer(), intervention, samples=2, max_new_tokens=4, batch_size=4,
                     n_boot=200, ppl_text=TEXT, ppl_window=32, ppl_stride=16, threshold=0.5)
    primary = run(tiny_llama, intervention, threshold=0.5)
    for key in ("baseline", "intervention", "toxicity_reduction", "tph"):
        assert both[key] == primary[key], key
    toxicity = ("toxicity_rate", "at_least_once", "expected_max_toxicity")
    for arm in ("baseline", "intervention"):
        assert both["judges"]["code-sum"][arm] == {k: alone[arm][k] for k in toxicity}
    assert both["judges"]["code-sum"]["toxicity_reduction"] == alone["toxicity_reduction"]
    json_path, png_path = write_report(both, tmp_path, intervention)  # a toxicity bar pair per judge
    assert json.loads(json_path.read_text()) == both and png_path.stat().st_size > 1000


def test_the_same_scorer_as_second_judge_is_not_run_twice(tiny_llama: LoadedModel) -> None:
    class Counting(XScorer):
        calls = 0

        def score_texts(self, texts: Sequence[str]) -> list[float]:
            Counting.calls += 1
            return super().score_texts(texts)

    scorer = Counting()
    report = run(tiny_llama, some_intervention(tiny_llama, alpha=0.0), second_scorer=scorer)
    assert Counting.calls == 1
    assert report["judges"]["x-share"]["baseline"] == {k: report["baseline"][k] for k in report["judges"]["x-share"]["baseline"]}


def test_fluency_figures_are_those_of_the_arms_token_ids(tiny_llama: LoadedModel) -> None:
    intervention = some_intervention(tiny_llama, alpha=-2.0, k=8)
    report = run(tiny_llama, intervention)
    sampling = {"samples": 2, "max_new_tokens": 4, "do_sample": True, "top_p": 0.95, "temperature": 1.0, "seed": 0,
                "batch_size": 4}
    for arm, edit in (("baseline", None), ("intervention", intervention)):
        continuations = generate_continuations(tiny_llama, PROMPTS, intervention=edit, **sampling)
        expected = fluency_metrics(token_sequences(continuations))
        assert {k: report[arm][k] for k in expected} == pytest.approx(expected), arm


def test_a_second_judge_that_cannot_load_is_an_input_error_on_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing_package(argument: str, device: torch.device) -> None:
        raise InputError("scorer 'broken' needs the broken wheel: pip install broken", field="scorer")

    monkeypatch.setitem(scoring._REGISTRY, "broken", missing_package)
    with pytest.raises(InputError, match="pip install broken") as error:
        load_second_scorer("broken", device="cpu")
    assert error.value.field == "second_scorer"
    with pytest.raises(InputError, match="did you mean") as error:
        load_second_scorer("profanty", device="cpu")
    assert error.value.field == "second_scorer"
    assert load_second_scorer(None, device="cpu") is None
    assert load_second_scorer("profanity", device="cpu").name == "profanity"

"""Step 1 on tiny models: captured states are the ones that chose each token, batching changes nothing;
sharing a prompt's prefill among its samples, filtering the nucleus without an argsort and replaying
torch.multinomial's draws change no token and no state; batches run side by side give what one batch at a
time gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from eigenshift_core.errors import InputError
from eigenshift_core.generation import Continuations, capture_continuation_states, generate_continuations
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, lm_head_weight, output_layer
from eigenshift_core.progress import Cancelled
from eigenshift_core.prompts import load_prompts
from tests.conftest import RTP_CSV

PROMPTS = ["hello there", "a", "the quick brown fox jumps over the lazy dog", "zz top"]
CONTINUATIONS = [" general kenobi", " b c d", "!", " is a band"]


def test_captured_state_reproduces_the_greedy_token(tiny: LoadedModel) -> None:
    result = generate_continuations(tiny, PROMPTS, max_new_tokens=6, batch_size=3)
    w = lm_head_weight(tiny.model)
    assert result.states.shape == (len(PROMPTS), 6, w.shape[1])
    for row in range(len(result)):
        assert int(result.lengths[row]) > 0
        assert torch.equal((result.row_states(row) @ w.T).argmax(-1), result.row_tokens(row))


def test_batch_size_and_padding_do_not_change_greedy_outputs(tiny: LoadedModel) -> None:
    one = generate_continuations(tiny, PROMPTS, max_new_tokens=5, batch_size=1)
    all_ = generate_continuations(tiny, PROMPTS, max_new_tokens=5, batch_size=4)
    assert torch.equal(one.token_ids, all_.token_ids)
    assert torch.allclose(one.states, all_.states, atol=1e-4)


def test_samples_are_prompt_major_and_seeded(tiny: LoadedModel) -> None:
    kwargs = {"samples": 3, "max_new_tokens": 8, "do_sample": True, "top_p": 0.95, "batch_size": 4}
    a = generate_continuations(tiny, PROMPTS, seed=7, **kwargs)
    b = generate_continuations(tiny, PROMPTS, seed=7, **kwargs)
    c = generate_continuations(tiny, PROMPTS, seed=8, **kwargs)
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(a.token_ids, b.token_ids)
    assert not torch.equal(a.token_ids, c.token_ids)


def test_identity_intervention_generates_the_same_text(tiny: LoadedModel) -> None:
    d = lm_head_weight(tiny.model).shape[1]
    identity = Intervention(torch.eye(d)[:3], torch.ones(3), torch.ones(3), torch.arange(3), torch.zeros(d), torch.zeros(d))
    plain = generate_continuations(tiny, PROMPTS, max_new_tokens=5)
    with_hook = generate_continuations(tiny, PROMPTS, max_new_tokens=5, intervention=identity)
    assert torch.equal(plain.token_ids, with_hook.token_ids)
    assert torch.equal(plain.states, with_hook.states)  # captured before the (identity) edit


def test_teacher_forced_states_are_the_lm_head_inputs(tiny: LoadedModel) -> None:
    result = capture_continuation_states(tiny, PROMPTS, CONTINUATIONS, batch_size=2)
    w = lm_head_weight(tiny.model)
    for row, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS, strict=True)):
        prompt_ids = tiny.tokenizer(prompt)["input_ids"]
        cont_ids = tiny.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        assert result.row_tokens(row).tolist() == cont_ids
        with torch.inference_mode():
            logits = tiny.model(torch.tensor([prompt_ids + cont_ids])).logits[0]  # alone: no padding at all
        expected = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(cont_ids)]
        assert torch.allclose(result.row_states(row) @ w.T, expected, atol=1e-4)
        # spans slice back to the token's characters
        start, end = result.spans[row][0]
        assert continuation[start:end] == tiny.tokenizer.decode(cont_ids[:1])


def test_empty_inputs_are_input_errors(tiny_llama: LoadedModel) -> None:
    with pytest.raises(InputError, match="empty"):
        generate_continuations(tiny_llama, [])
    with pytest.raises(InputError, match="empty"):
        generate_continuations(tiny_llama, [""])
    with pytest.raises(InputError, match="differ"):
        capture_continuation_states(tiny_llama, ["a"], ["b", "c"])


def damping(lm: LoadedModel, k: int = 4, seed: int = 0) -> Intervention:
    """Removes k random orthonormal directions entirely (α = 0): strong enough to change what is sampled."""
    d = lm_head_weight(lm.model).shape[1]
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return Intervention(q.T.contiguous(), torch.zeros(k), torch.ones(k), torch.arange(k), torch.zeros(d), torch.zeros(d))


def assert_same_generation(lm: LoadedModel, prompts: list[str], **kwargs) -> None:
    """Today's path (every row prefilled, transformers' top-p) and ours (shared prefill, sort-free top-p)."""
    per_row = generate_continuations(lm, prompts, share_prefill=False, fast_sampling=False, **kwargs)
    shared = generate_continuations(lm, prompts, share_prefill=True, fast_sampling=True, **kwargs)
    assert torch.equal(shared.token_ids, per_row.token_ids)
    assert torch.equal(shared.lengths, per_row.lengths)
    assert torch.allclose(shared.states, per_row.states, atol=1e-5)
    assert shared.texts == per_row.texts
    assert not lm.model._forward_hooks and not lm.model._forward_pre_hooks  # the prefill hooks are gone


SAMPLED = {"do_sample": True, "top_p": 0.95, "temperature": 1.0}


def test_fast_sampling_never_calls_torch_multinomial(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay really replaces the draw (were it to fall back, the equality tests would pass but slowly)."""
    expected = generate_continuations(tiny, PROMPTS, samples=3, max_new_tokens=6, seed=2, fast_sampling=False, **SAMPLED)

    def refuse(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise AssertionError("torch.multinomial was called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    with pytest.raises(AssertionError, match="multinomial"):
        generate_continuations(tiny, PROMPTS, samples=3, max_new_tokens=6, seed=2, fast_sampling=False, **SAMPLED)
    got = generate_continuations(tiny, PROMPTS, samples=3, max_new_tokens=6, seed=2, **SAMPLED)
    assert torch.equal(got.token_ids, expected.token_ids)


def test_sort_free_sampling_at_other_temperatures_and_masses(tiny: LoadedModel) -> None:
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.5), (1.0, 1.0)):
        assert_same_generation(tiny, PROMPTS, samples=2, max_new_tokens=6, batch_size=4, seed=5,
                               do_sample=True, top_p=top_p, temperature=temperature)


# 12 rows (4 prompts × 3 samples): batches of 2, 4 and 5 split some prompts' samples across batches.
@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 12])
@pytest.mark.parametrize("mode", ["sampled", "greedy"])
def test_shared_prefill_equals_prefilling_every_row(tiny: LoadedModel, batch_size: int, mode: str) -> None:
    sampling = SAMPLED if mode == "sampled" else {}
    assert_same_generation(tiny, PROMPTS, samples=3, max_new_tokens=8, batch_size=batch_size, seed=3, **sampling)


@pytest.mark.parametrize("batch_size", [4, 5])
def test_shared_prefill_keeps_the_intervention_in_every_step(tiny: LoadedModel, batch_size: int) -> None:
    edit = damping(tiny)
    kwargs = {"samples": 3, "max_new_tokens": 8, "batch_size": batch_size, "seed": 3, **SAMPLED}
    assert_same_generation(tiny, PROMPTS, intervention=edit, **kwargs)
    # Greedy: every token, the first one (from the shared prefill) included, is the argmax of the edited state.
    greedy = generate_continuations(tiny, PROMPTS, samples=2, max_new_tokens=6, batch_size=batch_size, intervention=edit)
    w = lm_head_weight(tiny.model)
    unedited_choices = []
    for row in range(len(greedy)):
        assert torch.equal((edit.apply(greedy.row_states(row)) @ w.T).argmax(-1), greedy.row_tokens(row))
        unedited_choices.append(torch.equal((greedy.row_states(row) @ w.T).argmax(-1), greedy.row_tokens(row)))
    assert not all(unedited_choices)  # the edit did change some choice


def test_shared_prefill_equals_prefilling_every_row_on_embedded(embedded: LoadedModel) -> None:
    prompts = load_prompts(RTP_CSV, "0:3").texts
    kwargs = {"samples": 3, "max_new_tokens": 4, "batch_size": 4, "seed": 11}  # batches of 4, 4, 1 rows
    assert_same_generation(embedded, prompts, **kwargs, **SAMPLED)
    assert_same_generation(embedded, prompts, intervention=damping(embedded, k=8), **kwargs, **SAMPLED)
    assert_same_generation(embedded, prompts[:2], **{**kwargs, "samples": 2})  # greedy


def test_progress_is_reported_after_every_batch(tiny_llama: LoadedModel) -> None:
    calls: list[tuple[int, int]] = []
    generate_continuations(tiny_llama, PROMPTS, samples=3, max_new_tokens=2, batch_size=5,
                           on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(5, 12), (10, 12), (12, 12)]
    calls.clear()
    capture_continuation_states(tiny_llama, PROMPTS, CONTINUATIONS, batch_size=3,
                                on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 4), (4, 4)]


# --- batches side by side (workers) -------------------------------------------------------------------------

@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generating_threads(lm: LoadedModel) -> tuple[set[int], Callable[[], None]]:
    """The idents of the threads that run the model's forwards, and a function that stops recording them."""
    seen: set[int] = set()
    handle = lm.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    return seen, handle.remove


def one_thread_one_batch_at_a_time(lm: LoadedModel, prompts: list[str], **kwargs: object) -> Continuations:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate_continuations(lm, prompts, workers=1, **kwargs)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(before)


def assert_identical(got: Continuations, expected: Continuations) -> None:
    assert torch.equal(got.token_ids, expected.token_ids) and torch.equal(got.lengths, expected.lengths)
    assert torch.equal(got.states, expected.states) and got.texts == expected.texts


@pytest.mark.parametrize("share_prefill", [True, False])
@pytest.mark.parametrize("mode", ["sampled", "greedy", "sampled with an intervention"])
def test_batches_side_by_side_give_what_one_batch_at_a_time_gives(
    tiny: LoadedModel, two_threads: None, mode: str, share_prefill: bool,
) -> None:
    kwargs: dict = {"samples": 3, "max_new_tokens": 6, "batch_size": 2, "seed": 4, "share_prefill": share_prefill,
                    **({} if mode == "greedy" else SAMPLED)}
    if mode == "sampled with an intervention":
        kwargs["intervention"] = damping(tiny)
    expected = one_thread_one_batch_at_a_time(tiny, PROMPTS, **kwargs)
    threads, stop_recording = generating_threads(tiny)
    try:
        got = generate_continuations(tiny, PROMPTS, **kwargs)  # default workers: 2 here, one thread each
    finally:
        stop_recording()
    assert len(threads) == 2 and threading.get_ident() not in threads  # six batches, two worker threads
    assert_identical(got, expected)
    assert not tiny.model._forward_hooks and not tiny.model._forward_pre_hooks
    assert not output_layer(tiny.model)._forward_pre_hooks


def test_batches_side_by_side_on_embedded(embedded: LoadedModel, two_threads: None) -> None:
    prompts = load_prompts(RTP_CSV, "0:4").texts
    kwargs = {"samples": 3, "max_new_tokens": 4, "batch_size": 4, "seed": 11, "intervention": damping(embedded, k=8),
              **SAMPLED}
    assert_identical(generate_continuations(embedded, prompts, **kwargs),  # type: ignore[arg-type]
                     one_thread_one_batch_at_a_time(embedded, prompts, **kwargs))


def test_batches_side_by_side_leave_torch_as_they_found_it(tiny_llama: LoadedModel, two_threads: None) -> None:
    """The global generator does not move (each batch draws from its own), and torch's thread count is
    back, also for threads started afterwards (a worker's torch.set_num_threads sets their default)."""
    rng = torch.get_rng_state()
    generate_continuations(tiny_llama, PROMPTS, samples=2, max_new_tokens=3, batch_size=2, **SAMPLED)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == 2
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]


def test_a_cancel_starts_no_further_batch(tiny_llama: LoadedModel, two_threads: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    generate = tiny_llama.model.generate

    def counting(*args: object, **kwargs: object) -> object:
        started.append(1)
        time.sleep(0.05)  # each batch takes a while, so few start beside the first whatever the machine's speed
        return generate(*args, **kwargs)

    def cancel(_done: int, _total: int) -> None:
        raise Cancelled("stop")

    monkeypatch.setattr(tiny_llama.model, "generate", counting)
    # 24 rows in batches of 1: 24 batches. `caught` keeps the traceback, and with it the run's frame, alive, as
    # a caller that logs or stores the error does: the workers must have stopped all the same.
    with pytest.raises(Cancelled) as caught:
        generate_continuations(tiny_llama, PROMPTS, samples=6, max_new_tokens=4, batch_size=1, on_progress=cancel)
    assert 1 <= len(started) <= 12  # the first batch and those running beside it when it ended, not the rest
    count = len(started)
    time.sleep(0.5)
    assert len(started) == count  # and nothing goes on in the background
    assert torch.get_num_threads() == 2
    assert not output_layer(tiny_llama.model)._forward_pre_hooks
    assert caught.value.args == ("stop",)


def test_workers_are_checked(tiny_llama: LoadedModel) -> None:
    with pytest.raises(InputError) as error:
        generate_continuations(tiny_llama, PROMPTS, workers=0)
    assert error.value.field == "workers"
    with pytest.raises(InputError, match="transformers' sampler"):  # it draws from torch's global generator
        generate_continuations(tiny_llama, PROMPTS, workers=2, fast_sampling=False, **SAMPLED)

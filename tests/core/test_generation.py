"""Step 1 on tiny models: captured states are the ones that chose each token, batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from eigenshift_core.errors import InputError
from eigenshift_core.generation import capture_continuation_states, generate_continuations
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, lm_head_weight

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

"""Continuous batching: a row's tokens depend neither on its neighbours nor on when it joined the batch;
requests join a running batch; a key holding its share of the batch lets another key's rows in first."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.serving import Batcher, Decoder, GenerationRequest, Row, _Block, fair_pick
from eigenshift_core.errors import InputError
from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel

OTHERS = ["The worst people in the world are", "Shut up, you", "He is such a", "Hello",
          "I can't believe you would say that to me after everything we have been through together, and",
          "Once upon a time", "My neighbour keeps", "Why do you always", "The weather today is",
          "If you ever touch my car again I will", "She said that he was a", "Honestly, the whole team is"]


def _run(lm: LoadedModel, requests: list[GenerationRequest], *, join_per_step: int, prefill_tokens: int) -> list[Row]:
    """Every request through one decoder, `join_per_step` of them joining the running batch at each step."""
    decoder = Decoder(lm, prefill_tokens=prefill_tokens)
    pending, rows = list(requests), []
    while pending or not decoder.idle:
        for _ in range(join_per_step):
            if pending:
                rows.append(decoder.add(pending.pop(0)))
        decoder.step()
    return rows


def test_a_rows_tokens_do_not_depend_on_its_batch(embedded: LoadedModel, default_intervention: Path) -> None:
    detox = Intervention.load(default_intervention)
    prompt = "I can't believe you would say"
    targets = [GenerationRequest(prompt, 12, 0.0, 1.0, 0), GenerationRequest(prompt, 12, 0.0, 1.0, 0, detox),
               GenerationRequest(prompt, 12, 0.9, 0.9, 7), GenerationRequest(prompt, 12, 0.9, 0.9, 7, detox)]
    others = [GenerationRequest(p, 2 + 3 * (i % 4), 0.7 * (i % 2), 0.95, 100 + i, detox if i % 3 == 0 else None)
              for i, p in enumerate(OTHERS)]  # rows that join and leave around the targets; prompts over 12 tokens are fed in chunks
    alone = [_run(embedded, [target], join_per_step=1, prefill_tokens=256)[0] for target in targets]
    mixed = others[:3] + targets[:2] + others[3:8] + targets[2:] + others[8:]
    assert len(mixed) == 16
    rows = {id(row.request): row for row in _run(embedded, mixed, join_per_step=3, prefill_tokens=12)}
    for target, single in zip(targets, alone, strict=True):
        among = rows[id(target)]
        assert among.tokens == single.tokens and among.finish == single.finish
        assert len(single.tokens) > 0
    assert alone[0].tokens != alone[1].tokens or alone[0].logprobs != alone[1].logprobs  # detox took effect
    assert alone[0].tokens != alone[2].tokens  # and sampling did


def test_fair_pick_lets_a_waiting_key_in_before_one_over_its_share() -> None:
    assert fair_pick(["a", "a", "a", "b"], Counter(), room=2, share=1) == [0, 3]
    assert fair_pick(["a", "a", "b"], Counter({"b": 1}), room=2, share=1) == [0, 1]  # b holds its share
    assert fair_pick(["a", "a", "a"], Counter(), room=2, share=1) == [0, 1]  # alone, a may take all the room
    assert fair_pick(["a", "b", "c"], Counter(), room=5, share=1) == [0, 1, 2]
    assert fair_pick([], Counter(), room=3, share=1) == []


async def _completion_order(lm: LoadedModel, key_share: float) -> list[str]:
    batcher = Batcher(Decoder(lm, prefill_tokens=256), max_size=2, window_s=0.05, key_share=key_share)
    await batcher.start()
    done: list[str] = []
    try:
        async def call(key: str, rows: int) -> None:
            await batcher.generate([GenerationRequest("hello there", 24, 0.0, 1.0, 0)] * rows, key)
            done.append(key)

        await asyncio.gather(call("a", 4), call("b", 1))
    finally:
        await batcher.stop()
    return done


def test_a_key_over_its_share_waits_while_another_keys_rows_do(tiny_llama: LoadedModel) -> None:
    assert asyncio.run(_completion_order(tiny_llama, key_share=0.5)) == ["b", "a"]  # b runs beside a's first row
    assert asyncio.run(_completion_order(tiny_llama, key_share=1.0)) == ["a", "b"]  # first come first served


def test_a_request_joins_the_running_batch(tiny_llama: LoadedModel) -> None:
    long = GenerationRequest("abc", 200, 0.0, 1.0, 0)

    async def scenario() -> tuple[int, int]:
        batcher = Batcher(Decoder(tiny_llama), max_size=8, window_s=0.0)
        await batcher.start()
        loop = asyncio.get_running_loop()
        started, seen = asyncio.Event(), [0]

        def on_token(_token: int) -> bool:  # on the model thread
            seen[0] += 1
            loop.call_soon_threadsafe(started.set)
            return True

        try:
            running = asyncio.create_task(batcher.generate([replace(long, on_token=on_token)]))
            await started.wait()
            await batcher.generate([GenerationRequest("hello", 3, 0.0, 1.0, 0)])
            at_short_end = seen[0]
            output = (await running)[0]
        finally:
            await batcher.stop()
        return at_short_end, len(output.token_ids)

    at_short_end, total = asyncio.run(scenario())
    assert total == 200  # the long row ran to its budget
    assert at_short_end < total  # and the short one was done long before: it did not wait for the batch to end


def test_streamed_text_decodes_each_token_once(embedded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api.routes.openai_compat import ChoiceText

    text = "A long answer, token by token: héllo 日本語 🎉 " * 20
    ids = embedded.tokenizer(text)["input_ids"]
    decode = embedded.tokenizer.decode
    calls: list[int] = []
    monkeypatch.setattr(embedded.tokenizer, "decode", lambda tokens, **kw: calls.append(len(tokens)) or decode(tokens, **kw))
    choice = ChoiceText(embedded.tokenizer, stop=("never appears",))
    deltas = [choice.push(token) for token in ids]
    assert calls == []  # no whole-text decode per token: the streaming decoder saw each token once
    deltas.append(choice.finish())
    assert calls == [len(ids)] and "".join(deltas) == choice.text == text


def test_a_chunked_prompt_decodes_beside_the_batch_not_in_it(tiny_llama: LoadedModel) -> None:
    """A prompt too long for one step's budget keeps a cache of its own: the ordinary rows' cache is never
    left-padded to its length (every decode step would attend over it)."""
    decoder = Decoder(tiny_llama, prefill_tokens=8)
    short = [decoder.add(GenerationRequest(p, 80, 0.0, 1.0, 0)) for p in ("hi", "yo")]
    long = decoder.add(GenerationRequest("word " * 40, 4, 0.0, 1.0, 0))
    widths = []
    while not long.ended:
        decoder.step()
        if decoder._batch is not None:
            widths.append(decoder._batch.mask.shape[1])
            assert long not in decoder._batch.rows
    assert long.tokens and short[0].tokens and widths  # both decoded, the short ones in the batch
    assert max(widths) < long.fed // 2  # the long prompt's cache (fed tokens) never joined theirs
    decoder.step()  # the step after its last token lets its block go
    assert decoder._long == []


def test_whole_prompts_are_prefilled_packed_as_a_padded_batch_would_be(tiny_llama: LoadedModel) -> None:
    """One packed sequence (a block-diagonal mask) gives each row what a left-padded batch gives it, and
    computes the prompts' total length, not rows × the longest."""
    prompts = ["hi", "the quick brown fox jumps", "abc", "a somewhat longer prompt than the rest of them"]
    fed: list[int] = []
    handle = tiny_llama.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: fed.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        blocks = {}
        for packs in (True, False):
            decoder = Decoder(tiny_llama)
            assert decoder._packs  # tiny models use sdpa
            decoder._packs = packs
            rows = [decoder.add(GenerationRequest(p, 6, 0.0, 1.0, 0)) for p in prompts]
            blocks[packs] = (decoder._feed_group(rows), [row.tokens[:1] for row in rows], rows)
    finally:
        handle.remove()
    lengths = [len(p) for p in prompts]  # a byte tokenizer: one token per character
    assert fed == [sum(lengths), len(prompts) * max(lengths)]
    (packed, packed_first, _), (padded, padded_first, _) = blocks[True], blocks[False]
    assert packed_first == padded_first
    assert torch.equal(packed.mask, padded.mask)  # the same left-padded layout
    for (k1, v1), (k2, v2) in zip(_layers(packed), _layers(padded), strict=True):
        assert k1.shape == k2.shape
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
        assert not k1.transpose(1, 2)[packed.mask == 0].any()  # (rows, width, heads, hd): padding holds zeros


def _layers(block: _Block) -> list[tuple[torch.Tensor, torch.Tensor]]:
    assert block.cache is not None
    return [(layer.keys, layer.values) for layer in block.cache.layers]


def test_a_packed_row_decodes_as_it_would_alone(tiny_llama: LoadedModel) -> None:
    requests = [GenerationRequest(p, 8, 0.0, 1.0, 0) for p in ("hello", "x", "zz top is a band", "fox")]
    alone = [_run(tiny_llama, [request], join_per_step=1, prefill_tokens=256)[0].tokens for request in requests]
    together = _run(tiny_llama, requests, join_per_step=4, prefill_tokens=256)
    assert [row.tokens for row in together] == alone


def test_the_served_head_is_hashed_once_however_many_interventions_load_at_once(
        tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import app.serving as serving
    from eigenshift_core.intervention import build_intervention
    from eigenshift_core.loading import lm_head_sha256
    from eigenshift_core.states import StateSet

    d = tiny_llama.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    states = StateSet(torch.randn(40, d, generator=g) + 1, torch.zeros(40, dtype=torch.long),
                      torch.randn(80, d, generator=g), torch.zeros(80, dtype=torch.long), {})
    built = build_intervention(tiny_llama.model, states, k=2, alpha=0.5)
    hashes: list[str] = []
    monkeypatch.setattr(serving, "lm_head_sha256", lambda model: hashes.append("x") or lm_head_sha256(model))
    resolved: list[str] = []
    server = serving.ModelServer(tiny_llama, lambda i: resolved.append(i) or built, max_size=1, window_s=0)
    threads = [threading.Thread(target=server.intervention, args=(name,)) for name in ("a", "a", "a", "b", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(resolved) == ["a", "b"] and len(hashes) == 1  # each loaded once, the head hashed once
    assert server.intervention("a") is built
    wrong = built.with_alphas(0.5)
    wrong.info["lm_head_sha256"] = "0" * 64
    other = serving.ModelServer(tiny_llama, lambda _: wrong, max_size=1, window_s=0)
    with pytest.raises(InputError, match="another lm_head"):
        other.intervention("c")  # the kept hash still refuses another head's intervention


def test_a_step_decodes_and_prefills_in_one_forward_pass(tiny_llama: LoadedModel) -> None:
    """New prompts joining a running batch go through the same forward pass as its decode step (one weight
    pass, attention kept apart), and every row gets what the two passes give it."""
    first = [GenerationRequest(p, 9, 0.0, 1.0, 0) for p in ("hello", "x", "zz top is a band")]
    joining = [GenerationRequest(p, 7, 0.8, 0.9, 3 + i) for i, p in enumerate(("fox", "a b c d e f", "q"))]
    forwards: list[int] = []
    handle = tiny_llama.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    results = {}
    try:
        for splits in (True, False):
            decoder = Decoder(tiny_llama, prefill_tokens=256)
            assert decoder._splits  # llama with sdpa
            decoder._splits = splits
            rows = [decoder.add(request) for request in first]
            decoder.step()  # prefill alone, then a decode
            forwards.clear()
            rows += [decoder.add(request) for request in joining]
            decoder.step()
            assert forwards == ([len(first) + sum(len(r.prompt) for r in joining)] if splits
                                else [sum(len(r.prompt) for r in joining), 1])
            while not decoder.idle:
                decoder.step()
            results[splits] = rows
    finally:
        handle.remove()
    for together, apart in zip(results[True], results[False], strict=True):
        assert together.tokens == apart.tokens and together.finish == apart.finish
        assert together.logprobs == pytest.approx(apart.logprobs, abs=1e-5)
    assert all(row.tokens for row in results[True])


def test_a_long_prompts_chunks_ride_in_the_decode_forward_pass(tiny_llama: LoadedModel) -> None:
    """While rows decode, each chunk of a long prompt goes through their forward pass (attending to its own
    cache only), and the long row then decodes as with a pass of its own."""
    results, passes = {}, {}
    forwards: list[int] = []
    handle = tiny_llama.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        for splits in (True, False):
            decoder = Decoder(tiny_llama, prefill_tokens=16)  # chunks of 2 tokens beside running rows
            decoder._splits = splits
            rows = [decoder.add(GenerationRequest(p, 40, 0.0, 1.0, 0)) for p in ("hi", "yo")]
            decoder.step()
            rows.append(decoder.add(GenerationRequest("word " * 8, 6, 0.8, 0.9, 4)))  # 40 tokens: too long for a step
            forwards.clear()
            steps = 0
            while rows[2].prompt:
                decoder.step()
                steps += 1
            passes[splits] = (len(forwards), steps)
            while not decoder.idle:
                decoder.step()
            results[splits] = rows
    finally:
        handle.remove()
    steps = passes[True][1]  # one pass per step, two apart; + the long row's first decode, in a block of its own
    assert passes == {True: (steps + 1, steps), False: (2 * steps + 1, steps)}
    for together, apart in zip(results[True], results[False], strict=True):
        assert together.tokens == apart.tokens and together.finish == apart.finish
        assert together.logprobs == pytest.approx(apart.logprobs, abs=1e-5)
    assert len(results[True][2].tokens) == 6


def test_other_forward_passes_meanwhile_compute_what_sdpa_does(tiny_llama: LoadedModel) -> None:
    """While a step's split attention is switched in, another user of the model (a padded batch, no split
    layout) gets exactly sdpa's masks and attention."""
    from app.serving import _split_attention

    batch = tiny_llama.tokenizer(["hello there", "x"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = tiny_llama.model(**batch).logits
        with _split_attention(tiny_llama.model):
            assert tiny_llama.model.config._attn_implementation != "sdpa"
            meanwhile = tiny_llama.model(**batch).logits
    assert tiny_llama.model.config._attn_implementation == "sdpa"
    assert torch.equal(meanwhile, expected)


def _positions_computed(lm: LoadedModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A hook counting the input positions of every forward pass of `lm`'s model (remove it when done)."""
    counted: list[int] = []

    def count(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        counted.append(int(kwargs["input_ids"].shape[1]) * int(kwargs["input_ids"].shape[0]))

    return counted, lm.model.register_forward_pre_hook(count, with_kwargs=True)


def test_a_prompt_seen_before_skips_its_prefill_and_continues_as_it_did(embedded: LoadedModel,
                                                                       default_intervention: Path) -> None:
    detox = Intervention.load(default_intervention)
    prompt, other = "I can't believe you would say", "Why do you always"
    requests = [GenerationRequest(prompt, 8, 0.0, 1.0, 0, detox), GenerationRequest(prompt, 8, 0.0, 1.0, 0),
                GenerationRequest(prompt, 8, 0.9, 0.9, 7, detox), GenerationRequest(prompt, 8, 0.9, 0.9, 7)]
    fresh = [_run(embedded, [request], join_per_step=1, prefill_tokens=256)[0] for request in requests]
    decoder = Decoder(embedded, prefill_tokens=256, prompt_cache_bytes=64 * 2**20)
    assert decoder.prompt_cache is not None
    first = decoder.add(GenerationRequest(prompt, 8, 0.0, 1.0, 0))  # alone: prefilled in a pass of its own
    decoder.step()
    decoder.add(GenerationRequest(other, 8, 0.0, 1.0, 0))  # joins a running row: prefilled in its pass
    decoder.step()
    assert len(decoder.prompt_cache) == 2
    while not decoder.idle:
        decoder.step()
    assert first.tokens == fresh[1].tokens
    counted, handle = _positions_computed(embedded)
    try:
        again = []
        for request in requests:  # one at a time: every forward pass decodes its one row, none prefills
            row = decoder.add(request)
            while not decoder.idle:
                decoder.step()
            again.append(row)
    finally:
        handle.remove()
    assert counted and set(counted) == {1}
    decoder.add(GenerationRequest("Once upon a time", 8, 0.0, 1.0, 0))
    decoder.step()  # a running batch, which the cached rows join beside a new prompt's one-pass prefill
    rows = [decoder.add(request) for request in (GenerationRequest("Hello", 8, 0.0, 1.0, 0), *requests)]
    while not decoder.idle:
        decoder.step()
    for cached in (again, rows[1:]):
        for row, uncached in zip(cached, fresh, strict=True):
            assert row.tokens == uncached.tokens and row.finish == uncached.finish
            assert row.logprobs == pytest.approx(uncached.logprobs, abs=1e-4)
    assert fresh[0].tokens != fresh[1].tokens or fresh[0].logprobs != fresh[1].logprobs  # detox took effect


def test_the_prompt_cache_keeps_the_most_recently_used_prompts_within_its_bytes() -> None:
    from app.serving import PromptCache

    def layers(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.full((1, 2, length, 4), float(length)), torch.zeros(1, 2, length, 4))] * 3

    entry_bytes = 3 * 2 * (2 * 10 * 4 * 4) + 8 * 4  # 3 layers, keys and values of 10 positions, hidden (8,)
    cache = PromptCache(max_bytes=2 * entry_bytes)
    hidden = torch.zeros(8)
    cache.put(None, [1, 2], layers(10), hidden)
    cache.put(None, [3], layers(10), hidden)
    assert cache.get(None, [1, 2]) is not None  # now the most recently used
    cache.put(None, [4], layers(10), hidden)  # evicts [3], the least recently used
    assert cache.get(None, [3]) is None and cache.get(None, [1, 2]) is not None and cache.get(None, [4]) is not None
    assert cache.bytes == 2 * entry_bytes and len(cache) == 2
    cache.put(None, [5], layers(30), hidden)  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(None, [5]) is None and len(cache) == 2
    source = layers(10)
    cache.put(None, [6], source, hidden)
    source[0][0].add_(1)  # the caller's tensors may change afterwards: the cache kept a copy
    entry = cache.get(None, [6])
    assert entry is not None and float(entry.layers[0][0].max()) == 10.0
    assert PromptCache(max_bytes=0).get(None, [1]) is None
    cache.put("key-a", [7], layers(10), hidden)  # owners are kept apart: another key's prompt is not a hit
    assert cache.get("key-a", [7]) is not None and cache.get("key-b", [7]) is None and cache.get(None, [7]) is None


@pytest.mark.parametrize("failing", ["prefill", "cached"])
def test_a_failed_step_hands_back_the_rows_it_took_in(embedded: LoadedModel, monkeypatch: pytest.MonkeyPatch,
                                                      failing: str) -> None:
    """`Batcher` fails the callers of the rows `clear` returns after a failed step: a row the step had taken out
    of the queue, for a prefill or from the prompt cache, must be among them, or its caller waits forever."""
    decoder = Decoder(embedded, prefill_tokens=256, prompt_cache_bytes=2**20 * 16)
    decoder.add(GenerationRequest("Hello there", 2, 0.0, 1.0, 0))
    while not decoder.idle:
        decoder.step()  # "Hello there" is now in the prompt cache
    running = decoder.add(GenerationRequest("Once upon a time", 8, 0.0, 1.0, 0))
    decoder.step()
    joining = [decoder.add(GenerationRequest("Hello there", 2, 0.0, 1.0, 0)),
               decoder.add(GenerationRequest("The weather today is", 2, 0.0, 1.0, 0))]

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the model failed")

    monkeypatch.setattr(Decoder, "_decode_and_feed" if failing == "prefill" else "_choose", broken)
    with pytest.raises(RuntimeError, match="the model failed"):
        decoder.step()
    handed_back = decoder.clear()
    assert all(any(row is r for r in handed_back) for row in [running, *joining])
    assert len(handed_back) == 3 and decoder.idle


def test_a_failed_step_hands_back_a_running_row_that_ended_in_it(embedded: LoadedModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that takes its last token in a step that then fails was never reported: `clear` returns it, so
    `Batcher` fails its caller instead of leaving it waiting."""
    decoder = Decoder(embedded, prefill_tokens=256)
    ending = decoder.add(GenerationRequest("Once upon a time", 3, 0.0, 1.0, 0))
    staying = decoder.add(GenerationRequest("The weather today is", 8, 0.0, 1.0, 0))
    assert decoder.step() == []  # both prefilled and decoded once: two tokens each

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the model failed")

    monkeypatch.setattr(Decoder, "_chunk_done", broken)  # runs after the batch's decode
    with pytest.raises(RuntimeError, match="the model failed"):
        decoder.step()  # `ending` takes its third and last token, then the step fails
    assert ending.ended and len(ending.tokens) == 3 and not staying.ended
    handed_back = decoder.clear()
    assert len(handed_back) == 2 and {id(row) for row in handed_back} == {id(ending), id(staying)}
    assert decoder.idle and decoder.clear() == []

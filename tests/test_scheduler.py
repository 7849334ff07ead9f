"""Continuous batching (fastllm.scheduler): many requests share one decode loop and one KV buffer, and no result
depends on what else runs: greedy tokens equal the request run alone, seeded sampling equals itself run alone,
prefix reuse changes nothing but the work done, cancelled and finished requests give their slots back."""

from __future__ import annotations

import asyncio
import gc
import os

import numpy as np
import pytest

import fastllm
from fastllm.errors import ContextLengthError, InvalidParameterError, InvalidPromptError, QueueFullError

CHUNK = 8  # small prefill chunks: prompts take several steps, interleaved with the others' decode steps


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _params(i: int) -> fastllm.SamplingParams:
    """Even requests greedy, odd ones seeded sampling; output lengths differ."""
    if i % 2 == 0:
        return fastllm.SamplingParams(max_new_tokens=6 + 3 * i, ignore_eos=True)
    return fastllm.SamplingParams(max_new_tokens=5 + 2 * i, temperature=0.9, top_p=0.9, seed=100 + i,
                                  ignore_eos=True, repetition_penalty=1.1)


def _alone(directory, prompts, params) -> list[tuple[int, ...]]:
    """Each request by itself: one slot, no prefix cache."""
    engine = fastllm.load(directory, slots=1, prefill_chunk=CHUNK, prefix_cache=False)
    try:
        return [engine.generate(p, q).token_ids for p, q in zip(prompts, params)]
    finally:
        engine.close()


def test_concurrent_requests_equal_each_run_alone(engines, arch):
    """10 requests, 4 slots: different prompt lengths, arriving while others decode, greedy and seeded sampling
    mixed, two cancelled midway (one decoding, one still waiting): every finished request's tokens are exactly
    those it gets alone, and every slot is free at the end."""
    directory = engines[arch].directory
    vocab = engines[arch].manifest.vocab_size
    prompts = _prompts(vocab, [3, 17, 9, 30, 5, 12, 24, 7, 19, 2])
    params = [_params(i) for i in range(len(prompts))]
    expected = _alone(directory, prompts, params)

    engine = fastllm.load(directory, slots=4, prefill_chunk=CHUNK)
    first = [engine.submit(p, q) for p, q in zip(prompts[:3], params[:3])]
    later = []
    for n, step in enumerate(first[0]):  # the rest arrive while the first ones decode
        if n in (1, 3, 5) and len(later) < len(prompts) - 3:
            count = 3 if n < 5 else len(prompts) - 3 - len(later)
            later += [engine.submit(prompts[3 + len(later) + k], params[3 + len(later) + k]) for k in range(count)]
    requests = first + later
    assert len(requests) == len(prompts)
    requests[5].cancel()  # waiting or just admitted
    decoding = requests[3]
    for n, _ in enumerate(decoding):
        if n == 2:
            decoding.cancel()
    results = [r.result(timeout=120) for r in requests]
    for i, (result, want) in enumerate(zip(results, expected)):
        if i in (3, 5):
            assert result.finish_reason == "cancelled"
            assert result.token_ids == want[: len(result.token_ids)]  # what it made before the cancel was right
        else:
            assert result.finish_reason == "length"
            assert result.token_ids == want, f"request {i} ({'greedy' if i % 2 == 0 else 'sampled'})"
    stats = engine.stats()
    assert stats["slots_in_use"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["slots"] == 4
    assert stats["decode_rows"] > 2 * stats["decode_steps"]  # they did decode together
    engine.close()


def test_prefix_reuse_changes_no_greedy_token(engines, arch):
    """Prompts sharing long prefixes, from a finished request (its slot taken over) and from a live one (its KV
    copied): with the prefix cache on, the same greedy tokens as with it off, and the hits are reported."""
    directory = engines[arch].directory
    vocab = engines[arch].manifest.vocab_size
    (base,) = _prompts(vocab, [40], seed=1)
    tails = _prompts(vocab, [3, 9, 1, 14], seed=2)
    prompts = [base + t for t in tails] + [base[:20] + tails[0]]
    params = fastllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs = {}
    for cache in (False, True):
        engine = fastllm.load(directory, slots=3, prefill_chunk=CHUNK, prefix_cache=cache)
        done = [engine.generate(prompts[0], params)]  # finished: its slot holds the prefix
        live = [engine.submit(p, params) for p in prompts[1:]]  # together: later ones copy from live slots
        done += [r.result(timeout=120) for r in live]
        outputs[cache] = done
        engine.close()
    assert [c.token_ids for c in outputs[True]] == [c.token_ids for c in outputs[False]]
    assert all(c.cached_tokens == 0 for c in outputs[False])
    cached = [c.cached_tokens for c in outputs[True]]
    assert cached[0] == 0
    assert cached[1] == 40  # the whole shared prefix, a multiple of the chunk: 40 = 5 chunks
    assert all(n % CHUNK == 0 for n in cached) and cached[-1] == 16  # 20 shared: two whole chunks
    assert all(n < c.prompt_tokens for n, c in zip(cached, outputs[True]))  # the last token is always computed


def test_a_prompt_is_reused_from_a_live_request(engines):
    """While one request still decodes, another with the same prompt prefix starts from a copy of its slot."""
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=2, prefill_chunk=CHUNK)
    (prompt,) = _prompts(engine.manifest.vocab_size, [33], seed=3)
    params = fastllm.SamplingParams(max_new_tokens=40, ignore_eos=True)
    long = engine.submit(prompt, params)
    next(iter(long))  # prefilled, decoding
    second = engine.submit(prompt, params.replace(max_new_tokens=5)).result(timeout=60)
    assert second.cached_tokens == 32
    assert second.token_ids == long.result(timeout=60).token_ids[:5]
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cached_tokens"] == 32
    engine.close()


def test_new_requests_take_slots_that_keep_the_decode_rows_together(engines):
    """A decode step runs the span of the live slots, idle ones inside it included. After 8 requests finished in
    an order unlike their slots' (5, 0, 3 first), 3 new prompts take 3 adjacent slots, not the 3 least recently
    released: the steps run no idle row, and the tokens are those of the requests alone."""
    directory = engines["LlamaForCausalLM"].directory
    engine = fastllm.load(directory, slots=8, prefill_chunk=CHUNK)
    vocab = engine.manifest.vocab_size
    lengths = {5: 2, 0: 12, 3: 24}
    first = [engine.submit(p, fastllm.SamplingParams(max_new_tokens=lengths.get(k, 40), ignore_eos=True))
             for k, p in enumerate(_prompts(vocab, [9] * 8, seed=11))]
    for request in first:
        request.result(timeout=60)
    before = engine.stats()
    prompts = _prompts(vocab, [9, 10, 11], seed=12)
    params = [fastllm.SamplingParams(max_new_tokens=20, ignore_eos=True)] * 3
    new = [engine.submit(p, q) for p, q in zip(prompts, params)]
    tokens = [r.result(timeout=60).token_ids for r in new]
    after = engine.stats()
    engine.close()
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows == 3 * 19  # each request's first token comes from its prefill
    assert after["decode_rows_run"] - before["decode_rows_run"] == rows
    assert tokens == _alone(directory, prompts, params)


def test_cancelled_requests_free_their_slots(engines):
    """Cancel while waiting, while prefilling and while decoding: each ends with finish_reason "cancelled", its
    slot is free at once for the next request, and the engine serves on."""
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=1, prefill_chunk=CHUNK)
    vocab = engine.manifest.vocab_size
    long_prompt, short = _prompts(vocab, [200, 4], seed=4)
    params = fastllm.SamplingParams(max_new_tokens=50, ignore_eos=True)
    decoding = engine.submit(short, params)
    waiting = engine.submit(short, params)
    next(iter(decoding))
    assert engine.stats()["slots_in_use"] == 1 and engine.stats()["waiting"] == 1
    waiting.cancel()
    decoding.cancel()
    assert decoding.result(timeout=30).finish_reason == "cancelled"
    assert waiting.result(timeout=30).finish_reason == "cancelled" and waiting.result().token_ids == ()
    steps = list(decoding)
    assert steps[-1].finish_reason == "cancelled" and steps[-1].token_id is None
    prefilling = engine.submit(long_prompt, params)  # 25 chunks: cancelled before its first token
    prefilling.cancel()
    assert prefilling.result(timeout=30).finish_reason == "cancelled"
    after = engine.generate(short, fastllm.SamplingParams(max_new_tokens=3))
    assert len(after.token_ids) == 3 or after.finish_reason == "stop"
    stats = engine.stats()
    assert stats["slots_in_use"] == 0 and stats["waiting"] == 0 and stats["prefilling"] == 0
    engine.close()


def test_a_full_queue_is_refused_at_once(engines):
    """max_queue requests waiting: the next submit raises QueueFullError (never blocks); generate() still waits."""
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=1, max_queue=2)
    params = fastllm.SamplingParams(max_new_tokens=100, ignore_eos=True)
    running = engine.submit([5, 6, 7], params)
    next(iter(running))
    queued = [engine.submit([5, 6], params), engine.submit([7, 8], params)]
    with pytest.raises(QueueFullError, match=r"2 requests are already waiting .*max_queue=2"):
        engine.submit([9], params)
    for r in [running, *queued]:
        r.cancel()
    assert engine.generate([[5], [6], [7]], fastllm.SamplingParams(max_new_tokens=2)) is not None
    engine.close()


def test_requests_from_an_event_loop(engines):
    """`async for` over requests from one event loop: they decode together and equal the blocking results."""
    engine = fastllm.load(engines["Qwen2ForCausalLM"].directory, slots=4)
    prompts = _prompts(engine.manifest.vocab_size, [4, 11, 6, 20, 8], seed=5)
    params = fastllm.SamplingParams(max_new_tokens=10, ignore_eos=True)

    async def one(prompt):
        request = engine.submit(prompt, params)
        ids = [step.token_id async for step in request]
        completion = await request.wait()
        assert tuple(ids) == completion.token_ids
        return completion.token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert got == [engine.generate(p, params).token_ids for p in prompts]
    engine.close()


def test_submit_refuses_bad_input_at_once(engines):
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=2, context=64)
    with pytest.raises(InvalidPromptError, match="one prompt"):
        engine.submit([[1, 2], [3]])
    with pytest.raises(ContextLengthError, match=r"\(60 tokens\) \+ max_new_tokens \(10\) exceeds the engine's slot "
                                                 r"context of 64 tokens"):
        engine.submit([4] * 60, {"max_new_tokens": 10})
    with pytest.raises(InvalidParameterError, match="temperature"):
        engine.submit([4], {"temperature": -1})
    assert engine.stats()["waiting"] == 0
    engine.close()
    with pytest.raises(fastllm.FastLLMError, match="closed"):
        engine.submit([4], {"max_new_tokens": 2})


@pytest.mark.parametrize("options, message", [
    ({"slots": 2, "kv_memory": 10**6}, "slots or kv_memory, not both"),
    ({"kv_memory": 10}, "holds no slot"),
    ({"slots": 0}, "slots must be a positive integer"),
    ({"context": 10**9}, "more than the model's context"),
    ({"max_queue": -1}, "max_queue must be"),
    ({"prefill_chunk": "big"}, "prefill_chunk must be"),
])
def test_serving_options_are_checked(engines, options, message):
    with pytest.raises(InvalidParameterError, match=message):
        fastllm.load(engines["LlamaForCausalLM"].directory, **options)


def test_kv_memory_decides_the_slot_count(engines):
    engine = engines["LlamaForCausalLM"]
    one = fastllm.load(engine.directory, context=128, slots=1).layout.slot_bytes
    sized = fastllm.load(engine.directory, context=128, kv_memory=3 * one + 1)
    assert sized.layout.slots == 3 and sized.stats()["slots"] == 3


def test_an_unused_engine_stops_its_loop(engines):
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=2)
    engine.generate([5, 6], {"max_new_tokens": 2})
    thread = engine._scheduler._thread
    assert thread.is_alive()
    del engine
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_does_not_grow_over_many_requests(engines):
    """1000 requests of mixed lengths, 8 at a time: RSS after all of them within 5% of RSS after the first 50 (the
    KV buffer is allocated once; nothing per request or per token stays behind)."""
    engine = fastllm.load(engines["LlamaForCausalLM"].directory, slots=8, prefill_chunk=16)
    vocab = engine.manifest.vocab_size
    rng = np.random.default_rng(6)

    def wave(n):
        requests = [engine.submit(rng.integers(3, vocab, size=int(rng.integers(1, 60))).tolist(),
                                  {"max_new_tokens": int(rng.integers(1, 12)), "ignore_eos": True,
                                   "temperature": float(rng.choice([0.0, 0.8])), "seed": int(rng.integers(1000))})
                    for _ in range(n)]
        for r in requests:
            r.result(timeout=120)

    for _ in range(5):
        wave(10)
    gc.collect()
    after_50 = _rss()
    for _ in range(95):
        wave(10)
    gc.collect()
    after_1000 = _rss()
    assert engine.stats()["requests_finished"] == 1000
    assert after_1000 <= after_50 * 1.05, (after_50, after_1000)
    engine.close()


def test_logit_bias_reaches_the_request_and_is_checked_against_the_vocabulary(engines):
    engine = engines["LlamaForCausalLM"]
    forced = engine.generate([5, 6, 7], {"max_new_tokens": 3, "logit_bias": {9: 100}, "ignore_eos": True})
    assert forced.token_ids == (9, 9, 9)
    with pytest.raises(InvalidParameterError, match=r"token ids \[99999\] .* outside the vocabulary"):
        engine.submit([5], {"max_new_tokens": 2, "logit_bias": {99999: 1}})

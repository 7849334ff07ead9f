"""Speculative decoding with prompt-lookup drafts (fastllm.speculative): the drafter finds what it should, and an
engine that speculates gives the tokens (and logprobs) of plain decoding, greedy and seeded sampling, on every
architecture, whatever ends the request."""

from __future__ import annotations

import numpy as np
import pytest

import fastllm
from fastllm.errors import InvalidParameterError
from fastllm.export.tiny import TINY_ARCHITECTURES
from fastllm.speculative import BACKOFF_MAX, DRAFT_MAX, DRAFT_START, PromptLookup


# -- the drafter ----------------------------------------------------------------------------------------------------
def test_the_latest_occurrence_of_the_longest_tail_is_continued():
    d = PromptLookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 100)
    assert d.draft(8) == [7, 8, 5, 1]  # (5, 1, 2, 3) occurs nowhere before, (1, 2, 3) twice: the latest one
    d = PromptLookup([4, 1, 2, 3, 6, 1, 2, 3, 5, 0, 1, 2, 3], 100)
    assert d.draft(8) == [5, 0, 1, 2]  # DRAFT_START tokens
    assert d.draft(2) == [5, 0]  # never more than the limit
    assert d.draft(0) == []


def test_no_draft_without_an_earlier_occurrence_and_tokens_extend_the_text():
    d = PromptLookup([10, 11, 12, 13], 5)  # capacity grows past what was asked
    assert d.draft(8) == []
    for token in (10, 11, 12):
        d.add(token)
    assert d.draft(8) == [13, 10, 11, 12]
    assert PromptLookup([7, 7, 7, 7, 7], 10).draft(8) == [7, 7, 7, 7]  # a loop goes on past the text's end
    assert PromptLookup([1, 2, 3, 1, 2, 3, 1, 2], 10).draft(8) == [3, 1, 2, 3]


def test_the_draft_length_adapts_and_backs_off_after_a_rejected_draft():
    d = PromptLookup([1, 2, 3, 4] * 8, 100)
    assert len(d.draft(100)) == DRAFT_START
    d.update(DRAFT_START, DRAFT_START)
    assert d.length == DRAFT_START + 2  # all kept: longer
    d.update(6, 2)
    assert d.length == 3  # some kept: what was kept, plus one
    d.update(3, 0)  # none kept: shorter, and one plain step
    assert d.length == 1 and d.draft(100) == [] and d.draft(100) == [1]
    d.update(1, 0)
    assert [d.draft(100) for _ in range(3)] == [[], [], [1]]  # the backoff doubles
    d.update(1, 1)
    d.update(3, 0)
    assert d.draft(100) == [] and d.draft(100) != []  # a kept draft reset it
    for _ in range(20):
        d.update(1, 0)
    assert d._penalty == BACKOFF_MAX
    d.update(1, 1)
    for _ in range(10):
        d.update(d.length, d.length)
    assert d.length == DRAFT_MAX


# -- the engine ------------------------------------------------------------------------------------------------------
def _repetitive(vocab: int, seed: int = 0) -> list[int]:
    """A prompt that repeats itself, so drafts are found; tiny random models also fall into loops of their own."""
    block = np.random.default_rng(seed).integers(3, vocab, size=12).tolist()
    return block * 3 + block[:5]


PARAMS = {
    "greedy": fastllm.SamplingParams(max_new_tokens=40, ignore_eos=True),
    "greedy-penalised": fastllm.SamplingParams(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.05),
    "sampled": fastllm.SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.7, top_p=0.9, seed=3),
    "logprobs": fastllm.SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.5, seed=5, logprobs=3),
}


def _params(mode: str, prompt: list[int]) -> fastllm.SamplingParams:
    """A random tiny model's text need not repeat itself: biased towards 2 of the prompt's ids, it does often enough
    that drafts are tried on every architecture and some kept, and (sampling) which are kept depends on each draw."""
    return PARAMS[mode].replace(logit_bias={t: 6.0 for t in prompt[:2]})


@pytest.fixture(scope="module")
def speculating(exported):
    engines = {arch: fastllm.load(exported[arch][1], threads=1, speculative=True) for arch in TINY_ARCHITECTURES}
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("mode", PARAMS)
def test_speculation_gives_the_tokens_of_plain_decoding(engines, speculating, arch, mode):
    plain, spec = engines[arch], speculating[arch]
    prompt = _repetitive(plain.manifest.vocab_size)
    before = spec.stats()
    params = _params(mode, prompt)
    got, want = spec.generate(prompt, params), plain.generate(prompt, params)
    after = spec.stats()
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason and got.completion_tokens == want.completion_tokens
    assert after["speculative_steps"] > before["speculative_steps"]  # drafts were tried
    if PARAMS[mode].greedy:
        assert after["accepted_tokens"] > before["accepted_tokens"]  # and some kept
    if mode == "logprobs":
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.token_id == b.token_id and [i for i, _ in a.top] == [i for i, _ in b.top]
            np.testing.assert_allclose([a.logprob, *(v for _, v in a.top)], [b.logprob, *(v for _, v in b.top)],
                                       atol=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_drafts_are_kept_where_the_model_repeats(engines, speculating, mode):
    """Summed over the architectures: drafts are kept (the multi-token path runs), unbiased greedy and sampled."""
    kept = 0
    for arch in TINY_ARCHITECTURES:
        prompt = _repetitive(engines[arch].manifest.vocab_size, seed=1)
        params = PARAMS[mode] if mode == "greedy" else _params(mode, prompt)
        before = speculating[arch].stats()["accepted_tokens"]
        assert speculating[arch].generate(prompt, params).token_ids == engines[arch].generate(prompt, params).token_ids
        kept += speculating[arch].stats()["accepted_tokens"] - before
    assert kept > 0


@pytest.mark.parametrize("limit", [1, 2, 5, 13])
def test_max_new_tokens_ends_inside_a_kept_draft(engines, speculating, limit):
    arch = TINY_ARCHITECTURES[0]
    prompt = _repetitive(engines[arch].manifest.vocab_size)
    params = PARAMS["greedy"].replace(max_new_tokens=limit)
    got, want = speculating[arch].generate(prompt, params), engines[arch].generate(prompt, params)
    assert got.token_ids == want.token_ids and len(got.token_ids) == limit and got.finish_reason == "length"


def test_stops_and_eos_end_a_speculating_request_where_plain_decoding_ends(engines, speculating):
    arch = TINY_ARCHITECTURES[0]
    plain, spec = engines[arch], speculating[arch]
    prompt = _repetitive(plain.manifest.vocab_size)
    full = plain.generate(prompt, PARAMS["greedy"]).token_ids
    cases = [PARAMS["greedy"].replace(stop_token_ids=(full[len(full) // 2],))]
    stop = plain.tokenizer.decode(full[20:22]) if plain.tokenizer else ""
    if stop.strip():
        cases.append(PARAMS["greedy"].replace(stop=(stop,)))
    for params in cases:
        got, want = spec.generate(prompt, params), plain.generate(prompt, params)
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason


def test_requests_running_together_do_not_speculate_and_are_unchanged(engines, speculating):
    arch = TINY_ARCHITECTURES[0]
    plain, spec = engines[arch], speculating[arch]
    prompts = [_repetitive(plain.manifest.vocab_size, seed) for seed in range(3)]
    want = [plain.generate(p, _params("sampled", p)).token_ids for p in prompts]
    requests = [spec.submit(p, _params("sampled", p)) for p in prompts]
    assert [r.result(timeout=120).token_ids for r in requests] == want


def test_speculative_is_checked(exported):
    with pytest.raises(InvalidParameterError, match="speculative must be True or False"):
        fastllm.load(exported[TINY_ARCHITECTURES[0]][1], speculative="yes")
    with pytest.raises(InvalidParameterError, match="needs the fused graph"):
        fastllm.load(exported[TINY_ARCHITECTURES[0], "portable"][1], speculative=True)

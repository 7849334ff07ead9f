"""Scoring: Engine.score equals the PyTorch model's log-likelihood per token, on every architecture and graph kind;
top-N alternatives, windows, chunked steps and the edges (one token, too long, bad parameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastllm
from fastllm import score as scoring
from fastllm.engine import PREFILL_CHUNK
from fastllm.sampler import TokenLogprob
from fastllm.score import Score, prompt_logits

LOGPROB_ATOL = 1e-4  # fp32 graph vs fp32 PyTorch, log-softmax in float64 on both sides
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"]


@torch.no_grad()
def reference_logprobs(hf_model, ids: list[int]) -> np.ndarray:
    """log p(ids[i+1] | ids[:i+1]) from transformers, (S-1,) float64."""
    logits = hf_model(input_ids=torch.tensor([ids])).logits[0].double()  # (S, V)
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def random_ids(vocab: int, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, vocab, size=length).tolist()


def test_one_prompt_equals_pytorch(engines, hf_models, variant):
    engine, hf_model = engines[variant], hf_models[variant[0]]
    result = engine.score(TEXTS[1])
    ids = engine.encode(TEXTS[1])
    assert isinstance(result, Score) and len(result) == len(ids) - 1
    assert result.token_ids.tolist() == ids[1:]
    expected = reference_logprobs(hf_model, ids)
    np.testing.assert_allclose(result.logprobs, expected, rtol=0, atol=LOGPROB_ATOL)
    assert result.total == pytest.approx(expected.sum(), abs=LOGPROB_ATOL * len(ids))
    assert result.mean == pytest.approx(result.total / len(result)) and result.perplexity == np.exp(-result.mean)
    assert result.top_ids.shape == result.top_logprobs.shape == (len(ids) - 1, 0)


def test_a_batch_of_text_and_ids_of_different_lengths(engines, hf_models, variant):
    engine, hf_model = engines[variant], hf_models[variant[0]]
    vocab = engine.manifest.vocab_size
    prompts = [TEXTS[0], random_ids(vocab, 37, 0), np.array(random_ids(vocab, 5, 1)), TEXTS[1], [7, 9]]
    results = engine.score(prompts)
    assert isinstance(results, list) and len(results) == len(prompts)
    for prompt, result in zip(prompts, results):
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(map(int, prompt))
        assert result.token_ids.tolist() == ids[1:]
        np.testing.assert_allclose(result.logprobs, reference_logprobs(hf_model, ids), rtol=0, atol=LOGPROB_ATOL)
        assert result.logprobs.tolist() == engine.score(ids).logprobs.tolist()  # batching changes nothing


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_top_logprobs_are_numpys_top_n_of_the_log_softmax(engines, graph):
    engine = engines["LlamaForCausalLM", graph]
    ids = random_ids(engine.manifest.vocab_size, 30, 2)
    result = engine.score(ids, top_logprobs=5)
    logits = prompt_logits(engine, ids)[:-1].astype(np.float64)  # (S-1, V)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    top = np.argsort(-log_p, axis=-1, kind="stable")[:, :5]
    assert result.top_ids.tolist() == top.tolist()
    np.testing.assert_allclose(result.top_logprobs, np.take_along_axis(log_p, top, -1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.logprobs, log_p[np.arange(len(ids) - 1), ids[1:]], rtol=0, atol=1e-12)
    assert (np.diff(result.top_logprobs, axis=-1) <= 0).all() and (result.top_logprobs[:, 0] >= result.logprobs).all()
    whole = engine.score(ids[:4], top_logprobs=engine.manifest.vocab_size)  # every id, sorted
    assert sorted(whole.top_ids[0].tolist()) == list(range(engine.manifest.vocab_size))
    assert np.exp(whole.top_logprobs).sum(-1) == pytest.approx(1.0)


def test_token_logprobs_are_the_samplers_type(engines):
    result = engines["LlamaForCausalLM"].score([3, 4, 5, 6], top_logprobs=2)
    tokens = result.token_logprobs()
    assert [type(t) for t in tokens] == [TokenLogprob] * 3
    assert [(t.token_id, t.logprob) for t in tokens] == list(zip([4, 5, 6], result.logprobs.tolist()))
    assert [t.top for t in tokens] == [tuple(zip(i, v)) for i, v in zip(result.top_ids.tolist(),
                                                                          result.top_logprobs.tolist())]


def test_top_n_breaks_ties_by_lower_id():
    rng = np.random.default_rng(6)
    for vocab, n in [(1, 1), (5, 2), (10, 10), (3000, 7), (40000, 20), (40000, 1)]:
        values = rng.integers(0, 4, (3, vocab)).astype(np.float64)  # many ties
        ids, top = scoring.top_n(values, n)
        expected = np.argsort(-values, axis=-1, kind="stable")[:, :n]
        assert ids.tolist() == expected.tolist() and top.tolist() == np.take_along_axis(values, expected, -1).tolist()
    assert scoring.top_n(values, 0)[0].shape == (3, 0)


def test_a_prompt_of_one_token_has_no_scored_positions(engines):
    engine = engines["LlamaForCausalLM"]
    one, two = engine.score([[5], [5, 6]], top_logprobs=3)
    assert len(one) == 0 and one.logprobs.shape == (0,) and one.top_ids.shape == (0, 3)
    assert one.total == 0.0 and np.isnan(one.mean) and np.isnan(one.perplexity)
    assert len(two) == 1


def test_too_long_is_a_context_length_error_and_windows_score_it(engines, hf_models):
    engine = engines["LlamaForCausalLM"]
    limit = engine.manifest.max_context
    ids = random_ids(engine.manifest.vocab_size, 2 * limit + 50, 3)
    assert len(engine.score(ids[: limit + 1])) == limit  # the last token is only predicted, never fed
    with pytest.raises(fastllm.ContextLengthError, match=rf"{limit + 2} tokens.*\({limit + 1}\).*context of {limit}"):
        engine.score(ids[: limit + 2])
    with pytest.raises(fastllm.ContextLengthError, match=r"prompt 1 has"):
        engine.score([ids[:3], ids])
    # windows of `limit` every half window: each position after the first window sees >= limit / 2 tokens
    half = limit // 2
    windowed = engine.score(ids, window=limit, stride=half)
    assert len(windowed) == len(ids) - 1
    first, second = engine.score(ids[: limit + 1]), engine.score(ids[half : half + limit + 1])
    np.testing.assert_array_equal(windowed.logprobs[:limit], first.logprobs)
    np.testing.assert_array_equal(windowed.logprobs[limit : limit + half], second.logprobs[half:])
    # the last window, shorter, ends at the prompt's end: it starts at 3 * half and keeps positions from 2 * limit
    expected = reference_logprobs(hf_models["LlamaForCausalLM"], ids[3 * half :])
    np.testing.assert_allclose(windowed.logprobs[2 * limit :], expected[2 * limit - 3 * half :], rtol=0,
                               atol=LOGPROB_ATOL)


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_memory_bounded_steps_give_the_same_scores(engines, graph, monkeypatch):
    engine = engines["Qwen2ForCausalLM", graph]
    ids = random_ids(engine.manifest.vocab_size, 200, 4)
    whole = engine.score(ids, top_logprobs=3)
    vocab = engine.manifest.vocab_size
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 48 * vocab)  # fused: steps of 48 positions through the cache
    monkeypatch.setattr(scoring, "SOFTMAX_BUDGET", 7 * vocab)  # log-softmax 7 positions at a time
    chunked = engine.score(ids, top_logprobs=3)
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, rtol=0, atol=1e-5)
    assert (chunked.top_ids[:, 0] == whole.top_ids[:, 0]).mean() > 0.95
    np.testing.assert_allclose(prompt_logits(engine, ids), prompt_logits(engine, ids, decode_after=len(ids)),
                               rtol=0, atol=0)  # decode_after=S: nothing to decode


def test_decode_after_feeds_the_rest_one_token_per_step(engines):
    engine = engines["MistralForCausalLM"]
    ids = random_ids(engine.manifest.vocab_size, 40, 5)
    prefilled, decoded = prompt_logits(engine, ids), prompt_logits(engine, ids, decode_after=10)
    scale = max(1.0, float(np.abs(prefilled).max()))
    assert np.abs(prefilled - decoded).max() <= 1e-4 * scale


def test_parameters_are_checked(engines):
    engine = engines["GPT2LMHeadModel"]
    vocab, limit = engine.manifest.vocab_size, engine.manifest.max_context
    for bad in (-1, vocab + 1, True, 1.5):
        with pytest.raises(fastllm.InvalidParameterError, match=rf"top_logprobs must be an integer in \[0, {vocab}\]"):
            engine.score("hello", top_logprobs=bad)
    with pytest.raises(fastllm.InvalidParameterError, match=rf"window must be an integer in \[1, {limit}\]"):
        engine.score("hello", window=limit + 1)
    with pytest.raises(fastllm.InvalidParameterError, match=r"stride must be an integer in \[1, 8\]"):
        engine.score("hello", window=8, stride=9)
    with pytest.raises(fastllm.InvalidParameterError, match="needs a window"):
        engine.score("hello", stride=4)
    with pytest.raises(fastllm.InvalidPromptError, match="empty"):
        engine.score("")


def test_results_are_read_only(engines):
    result = engines["LlamaForCausalLM"].score([3, 4, 5])
    with pytest.raises(ValueError):
        result.logprobs[0] = 0.0


def test_scoring_steps_are_the_engines_prefill_chunk():
    assert scoring.CHUNK == PREFILL_CHUNK

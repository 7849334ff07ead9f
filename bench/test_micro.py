"""pytest-benchmark micro-benchmarks, outside the default test run (pytest's testpaths is tests/):

    .venv/bin/python -m pytest bench/ --benchmark-only

One decode step of the tiny exported model (the session call and the sampling of one token, through the public
Engine.tokens loop), and the sampler: one row of logits per mode at the smollm2 (49,152) and Qwen2 (151,936)
vocabularies, a batch of 8 rows beside one row, logprobs=5, and 8 rows each with its own mode. Targets (issue 11):
<= 0.15 ms per token at 49k, <= 0.4 ms at 152k, a batch of 8 rows <= 4x one row.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import fastllm
from fastllm.bench import shapes
from fastllm.sampler import Sampler, SamplingParams, TokenHistory, sample

VOCAB = 50_257  # GPT-2's vocabulary


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    built = shapes.build(shapes.get("tiny"), tmp_path_factory.mktemp("bench-micro"), threads=1,
                         progress=lambda _line: None)
    return fastllm.load(built.fastllm_dirs[0], threads=1)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step(benchmark, tiny_engine, batch):
    prompts = np.random.default_rng(0).integers(0, tiny_engine.manifest.vocab_size, size=(batch, 32)).tolist()
    params = fastllm.SamplingParams(max_new_tokens=64, ignore_eos=True)

    def after_prefill():
        steps = tiny_engine.tokens(prompts, params)
        next(steps)  # prefill and the first token are not timed
        return (steps,), {}

    step = benchmark.pedantic(next, setup=after_prefill, rounds=300, iterations=1, warmup_rounds=5)
    assert len(step) == batch and None not in step


@pytest.mark.parametrize("params", [
    pytest.param(SamplingParams(), id="greedy"),
    pytest.param(SamplingParams(temperature=0.8, top_p=0.9, seed=0), id="top_p"),
])
def test_sampler(benchmark, params):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(VOCAB).astype(np.float32) * 3  # (vocab,)
    history = TokenHistory(VOCAB, rng.integers(0, VOCAB, size=128))
    token = benchmark(sample, logits, params, rng, history)
    assert 0 <= token < VOCAB


SAMPLED = 0.8  # the temperature of every sampled mode
THREADS = 2  # the sampler's threads (an engine gives it its own count): as `fastllm bench --threads 2` runs
MODES = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(temperature=SAMPLED),
    "top_k50": SamplingParams(temperature=SAMPLED, top_k=50),
    "top_p0.9": SamplingParams(temperature=SAMPLED, top_p=0.9),
    "min_p0.05": SamplingParams(temperature=SAMPLED, min_p=0.05),
    "penalties": SamplingParams(temperature=SAMPLED, repetition_penalty=1.1, presence_penalty=0.5,
                                frequency_penalty=0.5),
    "logprobs5": SamplingParams(temperature=SAMPLED, top_p=0.9, logprobs=5),
    "issue11_workload": SamplingParams(temperature=SAMPLED, top_p=0.95, repetition_penalty=1.1),
}


def _rows(vocab: int, batch: int):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)  # (batch, vocab)
    histories = []
    for _ in range(batch):  # ~300 seen ids: a 200-token prompt and 100 generated tokens
        history = TokenHistory(vocab, rng.integers(0, vocab, size=200))
        for token in rng.integers(0, vocab, size=100):
            history.add(int(token))
        histories.append(history)
    return logits, [np.random.default_rng(row) for row in range(batch)], histories


@pytest.mark.parametrize("vocab", [49_152, 151_936])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", MODES)
def test_sampler_per_step(benchmark, mode, batch, vocab):
    """One Sampler.sample call (one engine step) over `batch` rows; per token = the time / batch."""
    logits, rngs, histories = _rows(vocab, batch)
    sampler = Sampler(vocab, threads=THREADS)
    benchmark.extra_info["per_token_us"] = None
    ids, logprobs = benchmark(sampler.sample, logits, MODES[mode], rngs, histories)
    benchmark.extra_info["per_token_us"] = benchmark.stats.stats.min / batch * 1e6
    assert ids.shape == (batch,) and ((0 <= ids) & (ids < vocab)).all()
    assert (logprobs[0] is None) == (MODES[mode].logprobs is None)


@pytest.mark.parametrize("vocab", [49_152, 151_936])
def test_sampler_per_step_mixed(benchmark, vocab):
    """8 rows, each with its own params (one row per mode, as a continuous-batching step has them), every other
    row of the logits block (the scheduler passes `rows`): compare with the modes' 1-row times."""
    logits, rngs, histories = _rows(vocab, 16)
    params = [MODES[name] for name in MODES] * 2  # (16,) one per row of logits
    sampler = Sampler(vocab, threads=THREADS)
    ids, logprobs = benchmark(sampler.sample, logits, params, rngs, histories, rows=range(0, 16, 2))
    assert ids.shape == (8,) and ((0 <= ids) & (ids < vocab)).all()
    assert [lp is None for lp in logprobs] == [params[row].logprobs is None for row in range(0, 16, 2)]

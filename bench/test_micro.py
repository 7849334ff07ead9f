"""pytest-benchmark micro-benchmarks, outside the default test run (pytest's testpaths is tests/):

    .venv/bin/python -m pytest bench/ --benchmark-only

One decode step of the tiny exported model (the session call and the sampling of one token, through the public
Engine.tokens loop), and the sampler on one 50k-vocabulary logits row, greedy and top-p.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import fastllm
from fastllm.bench import shapes
from fastllm.sampler import SamplingParams, TokenHistory, sample

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

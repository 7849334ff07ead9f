"""Perplexity: the runtime's evaluator (no torch) and PyTorch's agree on the same windows; the corpus split."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastllm
from fastllm.export.corpus import HELD_OUT_EVERY, Document, pydoc_topics
from fastllm.perplexity import log_softmax_pick, perplexity, windows
from fastllm.train.evaluate import torch_perplexity

TEXT = " ".join(d.text for d in pydoc_topics()[:3])


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_runtime_and_pytorch_perplexity_agree(engines, hf_models, graph):
    engine = engines["LlamaForCausalLM", graph]
    ids = engine.encode(TEXT)[:2000]
    ours = perplexity(engine, ids, window=128)
    theirs = torch_perplexity(hf_models["LlamaForCausalLM"], np.array(ids), window=128)
    assert ours.tokens == theirs.tokens == (len(ids) - 1) // 128 * 128
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-4)
    assert ours.ppl > 1


def test_perplexity_of_a_known_distribution():
    # uniform logits over V ids: perplexity is exactly V
    logits = np.zeros((2, 5, 7), np.float32)
    targets = np.arange(10).reshape(2, 5) % 7
    nll = -log_softmax_pick(logits, targets)
    assert math.exp(nll.mean()) == pytest.approx(7.0)


def test_windows_shift_targets_by_one():
    x, y = windows(list(range(11)), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    with pytest.raises(fastllm.InvalidPromptError, match="needs more than one window"):
        windows([1, 2, 3], 5)


def test_window_is_checked(engines):
    with pytest.raises(fastllm.InvalidParameterError, match=r"window must be in \[2, 256\]"):
        perplexity(engines["GPT2LMHeadModel"], TEXT, window=1000)


def test_held_out_split_is_by_name_and_stable():
    docs = [Document(f"doc{i}", "x") for i in range(400)]
    held = [d.name for d in docs if d.held_out]
    assert 0 < len(held) < len(docs) / HELD_OUT_EVERY * 2
    assert held == [d.name for d in (Document(n, "other text") for n in held) if d.held_out]

"""fastllm greedy tokens equal transformers `generate(do_sample=False)`, alone and in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastllm

PROMPTS = [
    "def main():",
    "The quick brown fox jumps over the lazy dog, then keeps on running",
    "Return",
]
NEW = 32


def hf_greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """transformers generate, greedy, left-padded batch; tokens up to and including EOS."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), 1, dtype=torch.int64)  # pad id 1
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=1)
    results = []
    for row in out[:, width:].tolist():
        results.append(row[: row.index(0) + 1] if 0 in row else row)  # EOS id 0 ends a row; pads follow
    return results


def test_single_prompt_matches_transformers(engines, hf_models, tokenizer, variant):
    arch, _ = variant
    params = fastllm.SamplingParams(max_new_tokens=NEW)
    for prompt in PROMPTS:
        ours = engines[variant].generate(prompt, params)
        (theirs,) = hf_greedy(hf_models[arch], tokenizer, [prompt])
        assert list(ours.token_ids) == theirs, prompt
        assert ours.finish_reason == ("stop" if theirs[-1] == 0 else "length")


def test_batch_of_three_matches_transformers_and_single_runs(engines, hf_models, tokenizer, variant):
    arch, _ = variant
    params = fastllm.SamplingParams(max_new_tokens=NEW)
    batch = engines[variant].generate(PROMPTS, params)
    theirs = hf_greedy(hf_models[arch], tokenizer, PROMPTS)
    assert [list(c.token_ids) for c in batch] == theirs
    alone = [engines[variant].generate(p, params) for p in PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batch] == [len(tokenizer.encode(p).ids) for p in PROMPTS]


def test_token_id_prompts_equal_text_prompts(engines, tokenizer):
    engine = engines["LlamaForCausalLM"]
    params = fastllm.SamplingParams(max_new_tokens=8)
    ids = tokenizer.encode(PROMPTS[0]).ids
    assert engine.generate(ids, params).token_ids == engine.generate(PROMPTS[0], params).token_ids
    assert engine.generate(np.array(ids), params).token_ids == engine.generate(PROMPTS[0], params).token_ids


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_prompt_is_not_recomputed(exported, monkeypatch, graph):
    """Prefill runs once over each prompt; every later step feeds exactly one new token per row."""
    _, path = exported["LlamaForCausalLM", graph]
    engine = fastllm.load(path)
    seen = []
    if graph == "fused":  # the scheduler's forward passes: prefill (1, n) per prompt, decode (rows, 1)
        run = engine._scheduler._run

        def spy(binding, feeds, *args, **kw):
            seen.append(feeds["input_ids"].shape)
            return run(binding, feeds, *args, **kw)

        monkeypatch.setattr(engine._scheduler, "_run", spy)
    else:  # one request at a time, each with its own cache
        forward = engine.session.forward

        def spy(cache, binding, feeds, **kw):
            seen.append(feeds["input_ids"].shape)
            return forward(cache, binding, feeds, **kw)

        monkeypatch.setattr(engine.session, "forward", spy)
    c = engine.generate(["abc", "a longer prompt"], fastllm.SamplingParams(max_new_tokens=5, ignore_eos=True))
    prefills = [shape for shape in seen if shape[1] > 1]
    assert sorted(prefills) == sorted((1, x.prompt_tokens) for x in c)
    decodes = [shape for shape in seen if shape[1] == 1]
    assert sum(rows for rows, _ in decodes) >= 2 * 4
    if graph == "portable":
        assert decodes == [(1, 1)] * 8
    else:  # rows decode together once both are prefilled: fewer forward passes than tokens
        assert len(decodes) < 8


def test_chunked_prefill_matches_transformers(engines, hf_models, tokenizer, variant, monkeypatch):
    """A prompt longer than the prefill chunk is prefilled in steps (fused graph), alone or beside others: the same
    greedy tokens as transformers."""
    arch, graph = variant
    engine = fastllm.load(engines[variant].directory, prefill_chunk=4, prefix_cache=False)
    chunks = []
    if graph == "fused":
        step = engine._scheduler._prefill_step

        def counted():
            chunks.append(engine._scheduler._prefilling[0].id)
            return step()

        monkeypatch.setattr(engine._scheduler, "_prefill_step", counted)
    params = fastllm.SamplingParams(max_new_tokens=NEW)
    for prompt in PROMPTS:
        ours = engine.generate(prompt, params)
        assert list(ours.token_ids) == hf_greedy(hf_models[arch], tokenizer, [prompt])[0], prompt
    batch = engine.generate(PROMPTS, params)
    assert [list(c.token_ids) for c in batch] == hf_greedy(hf_models[arch], tokenizer, PROMPTS)
    if graph == "fused":
        widths = [len(tokenizer.encode(p).ids) for p in PROMPTS]
        per_request = [chunks.count(r) for r in dict.fromkeys(chunks)]
        assert per_request == [-(-w // 4) for w in widths] * 2

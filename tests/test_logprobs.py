"""Logprobs of generated and prompt tokens (SamplingParams(logprobs=N, prompt_logprobs=N)) in Completion and in
Engine.steps(), checked against a log-softmax computed here with numpy from logits we get by running the model
ourselves (fastllm.score.prompt_logits, through the same decode steps generation takes)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fastllm.engine import Step
from fastllm.sampler import SamplingParams
from fastllm.score import prompt_logits

PROMPT = "Return the value"
TOL = 1e-4  # float32 logits of the same decode steps, log-softmax in float64 on both sides

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=3)
SAMPLED = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3,
                         presence_penalty=0.2, frequency_penalty=0.1, seed=3, logprobs=5)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _expected(engine, prompt: list[int], generated: tuple[int, ...], params: SamplingParams) -> list[np.ndarray]:
    """Per generated token: log-softmax of the logits it was drawn from, after the penalties (CTRL over prompt and
    output so far, OpenAI presence/frequency over output so far) and the temperature (1 when greedy)."""
    ids = prompt + list(generated)
    raw = prompt_logits(engine, ids[:-1], decode_after=len(prompt))[len(prompt) - 1 :]  # (new, V)
    out = []
    for k, row in enumerate(raw):
        x = row.astype(np.float64)
        seen = sorted(set(prompt) | set(generated[:k]))
        p = params.repetition_penalty
        x[seen] = np.where(x[seen] > 0, x[seen] / p, x[seen] * p)
        for token, count in Counter(generated[:k]).items():
            x[token] -= params.presence_penalty + params.frequency_penalty * count
        out.append(_log_softmax(x / (params.temperature or 1.0)))
    return out


def _check_against_numpy(engine, prompt: list[int], completion, params: SamplingParams) -> None:
    assert len(completion.logprobs) == len(completion.token_ids)
    for lp, token, expected in zip(completion.logprobs, completion.token_ids,
                                   _expected(engine, prompt, completion.token_ids, params)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(expected[token], abs=TOL)
        assert len(lp.top) == params.logprobs
        top_ids = [i for i, _ in lp.top]
        assert top_ids == list(np.argsort(-expected, kind="stable")[: params.logprobs])
        assert [v for _, v in lp.top] == pytest.approx(expected[top_ids], abs=TOL)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel", ("Qwen2ForCausalLM", "portable")])
def test_greedy_logprobs_are_the_log_softmax_of_the_logits(engines, arch):
    engine = engines[arch]
    prompt = engine.encode(PROMPT)
    c = engine.generate(PROMPT, GREEDY)
    _check_against_numpy(engine, prompt, c, GREEDY)
    assert all(lp.top[0][0] == lp.token_id for lp in c.logprobs)  # greedy: the most likely token is the one taken
    assert c.prompt_logprobs is None


def test_sampled_logprobs_are_after_penalties_and_temperature(engines):
    engine = engines["LlamaForCausalLM"]
    prompt = engine.encode(PROMPT)
    c = engine.generate(PROMPT, SAMPLED)
    _check_against_numpy(engine, prompt, c, SAMPLED)
    assert any(lp.top[0][0] != lp.token_id for lp in c.logprobs)  # really sampled, not the argmax every time


def test_asking_for_logprobs_changes_no_token(engines):
    engine = engines["MistralForCausalLM"]
    for params in (GREEDY, SAMPLED):
        plain = engine.generate([PROMPT, "The"], params.replace(logprobs=None))
        with_logprobs = engine.generate([PROMPT, "The"], params.replace(prompt_logprobs=2))
        for a, b in zip(plain, with_logprobs):
            assert a.token_ids == b.token_ids and a.text == b.text
            assert a.logprobs is None and a.prompt_logprobs is None
            assert len(b.logprobs) == len(b.token_ids) and len(b.prompt_logprobs) == b.prompt_tokens


def test_logprobs_zero_gives_the_token_alone(engines):
    c = engines["LlamaForCausalLM"].generate(PROMPT, SamplingParams(max_new_tokens=3, logprobs=0))
    assert [lp.top for lp in c.logprobs] == [()] * len(c.token_ids) and all(lp.logprob <= 0 for lp in c.logprobs)


def test_batch_rows_get_their_own_logprobs(engines):
    engine = engines["GPT2LMHeadModel"]
    prompts = [PROMPT, "The"]  # different lengths: the shorter row is padded in the shared cache
    for prompt, c in zip(prompts, engine.generate(prompts, SAMPLED)):
        _check_against_numpy(engine, engine.encode(prompt), c, SAMPLED)


def test_prompt_logprobs_follow_each_prompt_token(engines):
    engine = engines["Phi3ForCausalLM"]
    prompt = engine.encode(PROMPT)
    c = engine.generate(PROMPT, SamplingParams(max_new_tokens=2, prompt_logprobs=2, temperature=0.5, seed=1))
    assert c.logprobs is None
    assert len(c.prompt_logprobs) == len(prompt) == c.prompt_tokens and c.prompt_logprobs[0] is None
    raw = prompt_logits(engine, prompt)  # (S, V): row j predicts token j + 1; raw logits, no temperature
    for j, lp in enumerate(c.prompt_logprobs[1:], start=1):
        expected = _log_softmax(raw[j - 1])
        assert lp.token_id == prompt[j] and lp.logprob == pytest.approx(expected[prompt[j]], abs=TOL)
        assert [i for i, _ in lp.top] == list(np.argsort(-expected, kind="stable")[:2])
    score = engine.score(PROMPT, top_logprobs=2)
    assert [lp.logprob for lp in c.prompt_logprobs[1:]] == pytest.approx(score.logprobs.tolist(), abs=1e-9)


def test_steps_stream_text_and_logprobs_as_generate_returns_them(engines):
    engine = engines["GPT2LMHeadModel"]
    params = SAMPLED.replace(prompt_logprobs=1, max_new_tokens=12, stop="e")
    prompts = [PROMPT, "The"]
    steps = list(engine.steps(prompts, params))
    for row, c in enumerate(engine.generate(prompts, params)):
        mine = [s[row] for s in steps if s[row] is not None]
        assert all(isinstance(s, Step) for s in mine)
        assert tuple(s.token_id for s in mine) == c.token_ids
        assert tuple(s.logprob for s in mine) == c.logprobs
        assert "".join(s.text for s in mine) == c.text
        assert [s.finish_reason for s in mine] == [None] * (len(mine) - 1) + [c.finish_reason]
        assert mine[0].prompt_logprobs == c.prompt_logprobs and all(s.prompt_logprobs is None for s in mine[1:])


def test_steps_without_logprobs(engines):
    engine = engines["LlamaForCausalLM"]
    steps = [step for (step,) in engine.steps("The", SamplingParams(max_new_tokens=4, ignore_eos=True))]
    assert len(steps) == 4 and all(s.logprob is None and s.prompt_logprobs is None for s in steps)

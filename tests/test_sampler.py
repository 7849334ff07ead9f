"""The sampler against distributions computed by hand on small logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastllm
from fastllm.sampler import SamplingParams, TokenHistory, apply_penalties, probabilities, sample

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))  # softmax = these probabilities


def params(**kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), **kw)


def test_temperature_one_keeps_the_distribution():
    np.testing.assert_allclose(probabilities(LOGITS, params()), [0.5, 0.2, 0.15, 0.1, 0.05], atol=1e-6)


def test_temperature_sharpens():
    # T = 0.5 squares the probabilities before normalising
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(probabilities(LOGITS, params(temperature=0.5)), p / p.sum(), atol=1e-6)


def test_top_k():
    np.testing.assert_allclose(probabilities(LOGITS, params(top_k=2)), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.5 < 0.6 -> add 0.2 (0.7 >= 0.6): keep the first two
    np.testing.assert_allclose(probabilities(LOGITS, params(top_p=0.6)), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)
    # 0.84 is reached by three tokens (0.85)
    np.testing.assert_allclose(probabilities(LOGITS, params(top_p=0.84)),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)
    # a tiny top_p still keeps the most likely token
    np.testing.assert_allclose(probabilities(LOGITS, params(top_p=0.01)), [1, 0, 0, 0, 0], atol=1e-6)


def test_min_p_is_relative_to_the_top_probability():
    # threshold 0.28 * 0.5 = 0.14: keeps 0.5, 0.2, 0.15
    np.testing.assert_allclose(probabilities(LOGITS, params(min_p=0.28)),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)


def test_filters_compose_in_order():
    # top_k=4 -> [.5,.2,.15,.1]/.95 ; top_p=0.75 -> .526+.211=.737 < .75, add .158 -> three kept
    np.testing.assert_allclose(probabilities(LOGITS, params(top_k=4, top_p=0.75)),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    history = TokenHistory(4, prompt_ids=[0, 1])
    out = apply_penalties(logits.copy(), SamplingParams(repetition_penalty=2.0), history)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    # and the distribution follows: softmax of the penalised logits
    expected = np.exp(out - out.max()) / np.exp(out - out.max()).sum()
    np.testing.assert_allclose(probabilities(out, params()), expected, atol=1e-6)


def test_presence_and_frequency_penalties_count_generated_tokens():
    history = TokenHistory(3, prompt_ids=[2])
    for t in (0, 0, 1):
        history.add(t)
    out = apply_penalties(np.zeros(3, np.float32), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                          history)
    np.testing.assert_allclose(out, [-(0.5 + 0.5), -(0.5 + 0.25), 0.0])


def test_greedy_and_top_k_one_pick_the_argmax_at_any_temperature():
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.normal(size=100).astype(np.float32)
        best = int(np.argmax(logits))
        assert sample(logits, SamplingParams(), rng) == best
        for t in (0.1, 1.0, 5.0):
            assert sample(logits, SamplingParams(temperature=t, top_k=1), rng) == best


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(123)
    draws = np.bincount([sample(LOGITS, params(top_k=3), rng) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(draws, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


def test_same_seed_reproduces_and_other_seed_differs(engines):
    engine = engines["LlamaForCausalLM"]
    p = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7, ignore_eos=True)
    a, b = engine.generate("The", p), engine.generate("The", p)
    assert a.token_ids == b.token_ids and a.text == b.text
    c = engine.generate("The", SamplingParams(temperature=1.0, max_new_tokens=24, seed=8, ignore_eos=True))
    assert c.token_ids != a.token_ids


def test_top_k_one_equals_greedy_end_to_end(engines):
    engine = engines["GPT2LMHeadModel"]
    greedy = engine.generate("Return", SamplingParams(max_new_tokens=16))
    for t in (0.7, 1.5):
        assert engine.generate("Return", SamplingParams(max_new_tokens=16, temperature=t, top_k=1, seed=3)).token_ids \
            == greedy.token_ids


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("min_p", -0.1, r"min_p must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("temperature", math.nan, "temperature must be >= 0"),
    ("seed", -1, "seed must be a non-negative integer"),
    ("stop", ("",), "stop must be non-empty strings"),
])
def test_invalid_parameters_name_field_and_value(field, value, message):
    with pytest.raises(fastllm.InvalidParameterError, match=message):
        SamplingParams(**{field: value})


# -- defaults from the model's generation config ----------------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [
    ({}, SamplingParams()),
    ({"do_sample": False, "temperature": 0.6, "top_k": 20}, SamplingParams()),  # greedy, as in transformers
    ({"do_sample": False, "repetition_penalty": 1.2}, SamplingParams(repetition_penalty=1.2)),
    ({"do_sample": True}, SamplingParams(temperature=1.0)),
    ({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
     SamplingParams(temperature=0.7, top_k=20, top_p=0.9)),
])
def test_params_from_a_generation_config(config, expected):
    assert SamplingParams.from_generation_config(config) == expected


def with_generation(engine, generation: dict) -> fastllm.Engine:
    import dataclasses

    manifest = dataclasses.replace(engine.manifest, generation=generation)
    return fastllm.Engine(engine.directory, manifest, engine.session, engine.tokenizer)


def test_params_none_uses_the_models_generation_config(engines):
    engine = with_generation(engines["GPT2LMHeadModel"], {"do_sample": False, "repetition_penalty": 1.5})
    assert engine.default_params() == SamplingParams(repetition_penalty=1.5)
    assert engine.generate("Return the").token_ids == \
        engine.generate("Return the", SamplingParams(repetition_penalty=1.5)).token_ids


def test_default_params_overrides_change_one_field(engines):
    engine = with_generation(engines["GPT2LMHeadModel"], {"do_sample": True, "temperature": 0.7, "top_k": 20})
    assert engine.default_params(temperature=0.2, seed=1) == SamplingParams(temperature=0.2, top_k=20, seed=1)


def test_an_unusable_generation_config_is_a_manifest_error(engines):
    engine = with_generation(engines["GPT2LMHeadModel"], {"do_sample": True, "top_p": 0.0})
    with pytest.raises(fastllm.ManifestError, match=r"generation config .*top_p must be in \(0, 1\].*pass params"):
        engine.generate("Return")

"""The sampler against distributions computed by hand on small logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastllm
from fastllm.errors import InvalidParameterError
from fastllm.sampler import Sampler, SamplingParams, TokenHistory, apply_penalties, probabilities, sample

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))  # softmax = these probabilities


@pytest.fixture(autouse=True)
def _backend(sampler_backend):
    """Every test here on the sampler backend it is parametrized with (conftest.py), the engine tests on "c"."""
    return sampler_backend


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


# -- the fast paths against a straightforward float64 reference --------------------------------------------------------
def reference(logits, p: SamplingParams, prompt=(), generated=()) -> np.ndarray:
    """The distribution by the book: dense penalties, float64, full sorts."""
    x = np.asarray(logits, dtype=np.float64).copy()
    seen = np.zeros(x.size, bool)
    seen[list(prompt) + list(generated)] = True
    counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=x.size)
    x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    x -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
    if p.greedy:
        one_hot = np.zeros(x.size)
        one_hot[np.argmax(x)] = 1.0
        return one_hot
    x /= p.temperature
    if 0 < p.top_k < x.size:
        x[x < np.sort(x)[-p.top_k]] = -np.inf
    q = np.exp(x - x.max())
    q /= q.sum()
    if p.top_p < 1:
        order = np.argsort(-q, kind="stable")
        cut = int(np.searchsorted(np.cumsum(q[order]), p.top_p, side="left")) + 1
        kept = np.zeros_like(q)
        kept[order[:cut]] = q[order[:cut]]
        q = kept / kept.sum()
    if p.min_p > 0:
        q[q < p.min_p * q.max()] = 0
        q /= q.sum()
    return q


def history_of(vocab, prompt, generated) -> TokenHistory:
    history = TokenHistory(vocab, prompt)
    for t in generated:
        history.add(int(t))
    return history


def rejection(p: SamplingParams) -> bool:
    """Top-p alone: when its nucleus is large the sampler draws by rejection, not by the inverse CDF at one u."""
    return p.top_p < 1 and not 0 < p.top_k < V and p.min_p == 0 and not p.greedy


def draws_follow(expected: np.ndarray, draw, n: int = 4000, groups: int = 10) -> None:
    """n seeded draws land only on tokens `expected` keeps, and in `groups` groups of equal expected mass (tokens
    in id order) as often as expected: chi-square with groups - 1 degrees of freedom below 33 (p ~ 1e-4)."""
    rng = np.random.default_rng(123)
    draws = np.array([draw(rng) for _ in range(n)])
    assert np.all(expected[draws] > 0), "a draw outside the kept set"
    edges = np.searchsorted(np.cumsum(expected), np.arange(1, groups) / groups)
    group_of = np.searchsorted(edges, np.arange(expected.size), side="right")
    mass = np.bincount(group_of, weights=expected, minlength=groups)
    seen = np.bincount(group_of[draws], minlength=groups)
    used = mass > 0  # (a heavy token can fill several groups' mass: those stay empty)
    chi2 = float((((seen[used] - n * mass[used]) ** 2) / (n * mass[used])).sum())
    assert chi2 < 33, (chi2, seen, n * mass)


class FixedDraw:
    """An rng whose random() is a given u, to compare inverse CDFs at chosen points."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


V = 50_000
ROWS = {  # (vocab,) float32 logits
    "peaked": (np.random.default_rng(1).standard_normal(V) * 3).astype(np.float32),  # 90% in ~100 tokens
    "flat": np.random.default_rng(2).standard_normal(V).astype(np.float32),  # 90% in ~30k tokens
    "middle": (np.random.default_rng(3).standard_normal(V) * 2).astype(np.float32),  # beyond the first candidates
}
MODES = {
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=0.8, top_k=50),
    "top_k_large": SamplingParams(temperature=1.3, top_k=5000),
    "top_p": SamplingParams(temperature=0.8, top_p=0.9),
    "top_p_high": SamplingParams(temperature=1.0, top_p=0.99),
    "min_p": SamplingParams(temperature=0.8, min_p=0.05),
    "top_k_top_p_min_p": SamplingParams(temperature=0.7, top_k=200, top_p=0.8, min_p=0.02),
    "top_p_min_p": SamplingParams(temperature=1.0, top_p=0.95, min_p=0.1),
    "penalties": SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5,
                                frequency_penalty=0.5),
    "penalties_greedy": SamplingParams(repetition_penalty=1.3, frequency_penalty=2.0),
}


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("mode", MODES)
def test_fast_paths_draw_from_the_reference_distribution(row, mode):
    p = MODES[mode]
    rng = np.random.default_rng(4)
    prompt, generated = rng.integers(0, V, 200), rng.integers(0, V, 100)
    logits = ROWS[row].copy()
    history = history_of(V, prompt, generated)
    penalised_logits = apply_penalties(logits.copy(), p, history)
    expected = reference(logits, p, prompt, generated)
    np.testing.assert_array_equal(probabilities(penalised_logits, p) > 0, expected > 0)  # the same kept set
    np.testing.assert_allclose(probabilities(penalised_logits, p), expected, rtol=1e-4, atol=1e-9)
    if rejection(p):  # top-p alone: a flat nucleus is drawn by rejection, so check the draws' distribution
        draws_follow(expected, lambda rng: sample(logits, p, rng, history))
        np.testing.assert_array_equal(logits, ROWS[row])
        return
    # and the draw is the inverse CDF of that distribution (ties at a boundary within float32 rounding)
    cumulative = np.cumsum(expected)
    us = (np.arange(400) + 0.5) / 400
    drawn = np.array([sample(logits, p, FixedDraw(u), history) for u in us])
    wanted = np.minimum(np.searchsorted(cumulative, us * cumulative[-1], side="right"), V - 1)
    near_a_boundary = np.abs(cumulative[np.minimum(wanted, V - 1)] - us) < 1e-5
    assert np.all((drawn == wanted) | near_a_boundary), (drawn[drawn != wanted], wanted[drawn != wanted])
    np.testing.assert_array_equal(logits, ROWS[row])  # the caller's logits come back unchanged


def test_draws_over_the_whole_vocabulary_across_blocks():
    # heavy tokens at block edges and in the tail block, a light background everywhere else
    logits = np.full(V, -2.0, np.float32)
    heavy = [0, 1023, 1024, 2047, 30_000, V - 1]
    logits[heavy] = 3.0
    p = SamplingParams(temperature=1.0, seed=0)
    rng = np.random.default_rng(5)
    draws = np.array([sample(logits, p, rng) for _ in range(20_000)])
    expected = reference(logits, p)
    for t in heavy:
        assert abs(np.mean(draws == t) - expected[t]) < 0.01
    assert abs(np.mean(~np.isin(draws, heavy)) - (1 - expected[heavy].sum())) < 0.015


def test_same_seed_same_tokens():
    def run(seed):
        rng, history, tokens = np.random.default_rng(seed), TokenHistory(V, [1, 2, 3]), []
        for step in range(30):
            p = list(MODES.values())[step % len(MODES)]
            token = sample(ROWS["middle"] + np.float32(step % 3), p, rng, history)
            history.add(token)
            tokens.append(token)
        return tokens

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_a_batch_samples_each_row_as_alone():
    from fastllm.sampler import Sampler

    modes = list(MODES.values())
    logits = np.stack([ROWS[name] for name in ("peaked", "flat", "middle")] * 4)  # (12, V)
    params = [modes[i % len(modes)].replace(logprobs=i % 3) for i in range(len(logits))]
    histories = [history_of(V, [i, 7, 9], [i * 3, 5]) for i in range(len(logits))]
    rows = [0, 2, 3, 5, 8, 11]
    ids, logprobs = Sampler(V).sample(logits, params, [np.random.default_rng(i) for i in range(12)], histories,
                                      rows=rows)
    alone = Sampler(V)
    for i, row in enumerate(rows):
        one, lp = alone.sample(logits[row : row + 1], [params[row]], [np.random.default_rng(row)], [histories[row]])
        assert ids[i] == one[0] and logprobs[i] == lp[0]
        assert sample(logits[row], params[row], np.random.default_rng(row), histories[row]) == ids[i]


# -- logprobs -------------------------------------------------------------------------------------------------------
def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("mode", ["temperature", "top_k", "top_p", "min_p", "penalties", "penalties_greedy"])
@pytest.mark.parametrize("n", [0, 5, 20])
def test_logprobs_are_the_log_softmax_after_penalties_and_temperature(mode, n):
    from fastllm.sampler import Sampler

    p = MODES[mode].replace(logprobs=n)
    rng = np.random.default_rng(6)
    logits = np.stack([ROWS["peaked"], ROWS["flat"]])
    prompt = rng.integers(0, V, 50)
    histories = [history_of(V, prompt, []), history_of(V, prompt, [])]
    sampler, rngs = Sampler(V), [np.random.default_rng(0), np.random.default_rng(1)]
    for _ in range(3):  # a few steps, the history growing
        ids, logprobs = sampler.sample(logits, p, rngs, histories)
        for row in range(2):
            h = histories[row]
            x = logits[row].astype(np.float64)
            seen, counts = h.ids, h.counts
            x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
            x[seen] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
            expected = log_softmax(x / (p.temperature or 1.0))
            lp = logprobs[row]
            assert lp.token_id == ids[row]
            assert lp.logprob == pytest.approx(expected[ids[row]], abs=2e-5)
            top = np.argsort(-expected, kind="stable")[:n]
            assert [i for i, _ in lp.top] == top.tolist()
            np.testing.assert_allclose([v for _, v in lp.top], expected[top], atol=2e-5)
            h.add(int(ids[row]))


def test_no_logprobs_unless_asked():
    from fastllm.sampler import Sampler

    _, logprobs = Sampler(5).sample(LOGITS[None], params(), [np.random.default_rng(0)])
    assert logprobs == [None]


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_range(field):
    for ok in (None, 0, 20):
        assert getattr(SamplingParams(**{field: ok}), field) == ok
    for bad in (-1, 21):
        with pytest.raises(fastllm.InvalidParameterError, match=rf"{field} must be an integer in \[0, 20\] or None, "
                                                               rf"got {bad}"):
            SamplingParams(**{field: bad})
    with pytest.raises(fastllm.InvalidParameterError, match=rf"{field} must be .* got '5' of type str"):
        SamplingParams(**{field: "5"})


def test_history_is_compact():
    h = TokenHistory(V, [5, 3, 5, 9])
    for t in (3, 7, 7, 7):
        h.add(t)
    assert sorted(zip(h.ids.tolist(), h.counts.tolist())) == [(3, 1), (5, 0), (7, 3), (9, 0)]


def test_history_keeps_the_penalty_term_up_to_date():
    """The presence/frequency subtrahend, made once and then updated per added token (through growth past the
    first capacity), equals the formula over the counts; other penalty values make it anew."""
    h = TokenHistory(V, [5, 3, 5, 9])
    rng = np.random.default_rng(3)
    assert h.term(0.5, -0.25).tolist() == [0.0, 0.0, 0.0]
    for token in rng.integers(0, 200, 300).tolist():
        h.add(token)
        if token % 7 == 0:
            expected = (0.5 * (h.counts > 0) + -0.25 * h.counts).astype(np.float32)
            np.testing.assert_array_equal(h.term(0.5, -0.25), expected)
    assert h.ids.size > 64
    np.testing.assert_array_equal(h.term(1.5, 2.0), (1.5 * (h.counts > 0) + 2.0 * h.counts).astype(np.float32))


@pytest.mark.parametrize("layout", ["contiguous", "strided", "read_only"])
def test_a_batch_with_its_own_params_per_row_samples_each_row_as_alone(layout):
    """Rows in any order with different params (temperatures, filters, penalties, logprobs) get, together, the
    tokens and logprobs they get alone with the same rng state; the caller's logits come back unchanged."""
    from fastllm.sampler import Sampler

    modes = list(MODES.values())
    params = [modes[i % len(modes)].replace(temperature=0.5 + 0.1 * i, logprobs=(i % 4 or None))
              for i in range(10)] + [SamplingParams(), SamplingParams(logprobs=2, repetition_penalty=1.2)]
    base = np.stack([ROWS[name] for name in ("peaked", "flat", "middle")] * 4)  # (12, V)
    logits = {"contiguous": base.copy(), "strided": np.pad(base, ((0, 0), (0, 3)))[:, :V],
              "read_only": base.copy()}[layout]
    logits.flags.writeable = layout != "read_only"
    histories = [history_of(V, [i, 7, 9, 40_000 + i], [i * 3, 5, 5]) for i in range(12)]
    rows = [11, 0, 1, 2, 6, 5, 4, 9, 10]
    ids, logprobs = Sampler(V).sample(logits, params, [np.random.default_rng(i) for i in range(12)], histories,
                                      rows=rows)
    np.testing.assert_array_equal(logits, base)
    for i, row in enumerate(rows):
        one, lp = Sampler(V).sample(base[row : row + 1], [params[row]], [np.random.default_rng(row)],
                                    [histories[row]])
        assert ids[i] == one[0] and logprobs[i] == lp[0]


@pytest.mark.parametrize("params", [SamplingParams(logprobs=5), SamplingParams(temperature=0.8, logprobs=5),
                                    SamplingParams(temperature=0.8, top_p=0.9, logprobs=5),
                                    SamplingParams(temperature=0.8, top_k=300, logprobs=5)])
def test_logprob_alternatives_tied_in_value_come_by_id(params):
    """Ties at the n-th alternative are taken smallest id first, whichever candidates the draw found."""
    from fastllm.sampler import Sampler

    logits = np.zeros((2, V), dtype=np.float32)
    logits[:, 9_000] = 1.0
    logits[1, 20_000:] = -1.0
    _, logprobs = Sampler(V).sample(logits, params, [np.random.default_rng(0), np.random.default_rng(1)])
    for lp in logprobs:
        assert [i for i, _ in lp.top] == [9_000, 0, 1, 2, 3]


def test_logit_bias_moves_only_its_row_and_is_restored():
    """+100 on a token makes it the greedy pick, -100 on the argmax bans it; other rows of the step and the
    caller's logits are untouched."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 500)).astype(np.float32)
    before = logits.copy()
    top = int(np.argmax(logits[1]))
    plain = SamplingParams()
    rows = [plain, SamplingParams(logit_bias={7: 100.0}), SamplingParams(logit_bias={str(top): -100})]
    gens = [np.random.default_rng(i) for i in range(3)]
    ids, _ = Sampler(500).sample(logits, rows, gens, [None] * 3)
    assert ids[0] == np.argmax(before[0]) and ids[1] == 7
    third = before[2].copy()
    third[top] -= 100
    assert ids[2] == np.argmax(third)
    assert np.array_equal(logits, before)


def test_logit_bias_is_checked():
    assert SamplingParams(logit_bias={"12": 1, 3: -2.5}).logit_bias == ((3, -2.5), (12, 1.0))
    for bad, message in (({-1: 1}, "keys must be token ids"), ({"a": 1}, "keys must be token ids"),
                         ({1: 101}, r"values must be numbers in \[-100, 100\]"), ({1: "x"}, "values must be"),
                         ("1:2", "must be a mapping")):
        with pytest.raises(InvalidParameterError, match=message):
            SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("mode", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=0.7,
                                                                                                  top_p=0.3)])
def test_non_finite_logits_give_a_token_not_a_crash_or_a_hang(mode):
    """A model with NaN weights (the quality gate meets one) still yields ids; its perplexity reports the NaN."""
    vocab = 49_152
    rows = np.full((2, vocab), np.nan, dtype=np.float32)
    rows[1, :100] = np.inf
    sampler = Sampler(vocab)
    for batch in (rows[:1], rows):
        ids, _ = sampler.sample(batch.copy(), SamplingParams(**mode), [np.random.default_rng(0)] * len(batch))
        assert ((0 <= ids) & (ids < vocab)).all()


@pytest.mark.parametrize("mode", [
    pytest.param(SamplingParams(temperature=0.8, top_k=40), id="top_k-ties-at-the-kth"),
    pytest.param(SamplingParams(temperature=0.8, top_k=40, top_p=0.7, min_p=0.1), id="top_k-top_p-min_p-ties"),
    pytest.param(SamplingParams(temperature=1.5, min_p=0.3), id="min_p-many-candidates"),
])
def test_candidate_draws_where_ties_or_many_candidates_take_the_one_row_path(mode):
    """Rounded logits: dozens of ids tie at the k-th value (all of them are candidates); flat logits at a high
    temperature: thousands pass min-p. The draws still invert `probabilities`' distribution."""
    rng = np.random.default_rng(7)
    logits = np.round(rng.standard_normal(V) * 2).astype(np.float32) if mode.top_k else \
        (rng.standard_normal(V) * 0.3).astype(np.float32)
    expected = probabilities(logits, mode)
    if mode.top_k:  # the case is what it says: more ids reach the k-th value than k
        assert np.count_nonzero(logits >= np.sort(logits)[-mode.top_k]) > mode.top_k
    else:
        assert np.count_nonzero(expected) > 1024
    cumulative = np.cumsum(expected)
    us = (np.arange(200) + 0.5) / 200
    drawn = np.array([sample(logits, mode, FixedDraw(u)) for u in us])
    wanted = np.minimum(np.searchsorted(cumulative, us * cumulative[-1], side="right"), V - 1)
    near_a_boundary = np.abs(cumulative[wanted] - us) < 1e-5
    assert np.all((drawn == wanted) | near_a_boundary)
    rows = np.stack([logits, logits[::-1].copy()])  # and a row draws the same in a batch of two as alone
    ids, _ = Sampler(V).sample(rows, mode, [FixedDraw(0.37), FixedDraw(0.37)])
    assert ids.tolist() == [sample(logits, mode, FixedDraw(0.37)), sample(rows[1], mode, FixedDraw(0.37))]

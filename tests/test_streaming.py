"""Streaming text, the incremental detokenizer, stop strings and stop ids, and sharing an engine between threads."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastllm
from fastllm.engine import Engine, StopStrings
from fastllm.sampler import SamplingParams
from fastllm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["naïve café — 日本語のテキスト 🙂 and emoji 👩‍👩‍👧", "def f(x):\n    return x ** 2  # ünïcödé", "  spaces   and\ttabs"]


@pytest.fixture(scope="module")
def tok(exported):
    return Tokenizer(exported["LlamaForCausalLM"][1] / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_rebuilds_multibyte_text(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) / 4  # byte-level pieces really split characters here
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Prompt:"))
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_concatenates_to_the_completion_text(engines):
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel"):
        engine = engines[arch]
        for params in (SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.9, seed=5)):
            pieces = list(engine.stream("The function", params))
            assert len(pieces) > 1
            assert "".join(pieces) == engine.generate("The function", params).text


def test_stop_string_cuts_text_in_generate_and_stream(engines):
    engine = engines["GPT2LMHeadModel"]
    full = engine.generate("Return", SamplingParams(max_new_tokens=48, ignore_eos=True))
    text = full.text
    assert len(text) > 20
    stop = text[10:13]
    cut = text[: text.find(stop)]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, stop=(stop, "\x00never"))
    c = engine.generate("Return", params)
    assert c.text == cut and c.finish_reason == "stop" and c.completion_tokens < full.completion_tokens
    assert "".join(engine.stream("Return", params)) == cut


def test_stop_token_ids_end_the_sequence(engines):
    engine = engines["Qwen2ForCausalLM"]
    full = engine.generate("Return", SamplingParams(max_new_tokens=20, ignore_eos=True))
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    c = engine.generate("Return", SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=(stop_id,)))
    assert c.token_ids == full.token_ids[: first + 1] and c.finish_reason == "stop"


def test_length_finish_and_counts(engines):
    c = engines["Phi3ForCausalLM"].generate("Return", SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert c.finish_reason == "length" and c.completion_tokens == len(c.token_ids) == 7
    assert c.ttft_s > 0 and c.tpot_s > 0 and c.total_s >= c.ttft_s and c.tokens_per_s > 0


def test_closing_a_stream_early_ends_the_request(engines):
    engine = engines["LlamaForCausalLM"]
    stream = engine.stream("The", SamplingParams(max_new_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()  # the generator's finally releases the binding; the engine stays usable
    assert engine.generate("The", SamplingParams(max_new_tokens=3)).completion_tokens >= 1


def test_stream_takes_one_prompt(engines):
    with pytest.raises(fastllm.InvalidPromptError, match="stream\\(\\) takes one prompt"):
        list(engines["LlamaForCausalLM"].stream(["a", "b"]))


def test_one_engine_shared_between_threads(engines):
    engine = engines["MistralForCausalLM"]
    prompts = ["The", "def main():", "Return the value", "x"] * 2
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=11)
    alone = [engine.generate(p, params).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: engine.generate(p, params).token_ids, prompts))
    assert together == alone


def test_token_level_iterator_matches_generate(engines):
    engine = engines["GPT2LMHeadModel"]
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=2)
    steps = list(engine.tokens(["The", "Return the value"], params))
    batch = engine.generate(["The", "Return the value"], params)
    for row, c in enumerate(batch):
        assert tuple(t[row] for t in steps if t[row] is not None) == c.token_ids


# -- stop strings, per token ----------------------------------------------------------------------------------------
def _whole_text_reference(pieces, stops):
    """What the engine did before it searched per piece: after each piece, search the whole text and recompute the
    hold-back over its tail. Yields (cut position or None, hold-back) per piece."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [at for at in (text.find(s) for s in stops) if at >= 0]
        if hits:
            yield min(hits), None
            return
        hold = 0
        for stop in stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-n:]):
                    hold = max(hold, n)
                    break
        yield None, hold


def test_stop_strings_cut_and_hold_back_as_a_whole_text_search_does():
    rng, cuts, holds = random.Random(0), 0, 0
    for trial in range(400):
        alphabet = "ab c" if trial % 2 else "aab"
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                      for _ in range(rng.randint(1, 3)))
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 1, 2, 3, 7)))) for _ in range(40)]
        matcher, length = StopStrings(stops), 0
        for piece, (cut, hold) in zip(pieces, _whole_text_reference(pieces, stops)):
            at = matcher.feed(piece)
            assert (None if at is None else length + at) == cut, (stops, pieces)
            if cut is not None:
                cuts += 1
                break
            assert matcher.hold == hold, (stops, pieces)
            holds += hold > 0
            length += len(piece)
    assert cuts > 100 and holds > 100  # both paths really exercised


def test_stop_check_per_token_looks_at_a_bounded_window_at_20k_characters():
    stops = ("<|end|>", "\n\nUser:", "x")
    longest = max(map(len, stops))
    rng = random.Random(0)
    matcher, fed, examined = StopStrings(stops), 0, []
    while fed < 20_000:
        piece = "".join(rng.choice("abc <|end>User:\n") for _ in range(rng.randint(1, 6)))
        if matcher.feed(piece) is not None:
            matcher = StopStrings(stops)  # a stop string came up: go on with a fresh matcher, as a new request would
        fed += len(piece)
        examined.append((matcher.examined, len(piece)))
        assert matcher.examined <= len(piece) + longest - 1 and len(matcher.tail) <= longest - 1
    assert max(e for e, _ in examined[-1000:]) <= 6 + longest - 1  # flat: the same at 20k characters as at the start


def test_stop_string_split_over_many_tokens_is_held_back_then_cut(engines):
    engine = engines["GPT2LMHeadModel"]
    text = engine.generate("Return", SamplingParams(max_new_tokens=48, ignore_eos=True)).text
    stop = text[12:30]  # long enough to span several tokens
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, stop=stop)
    pieces = list(engine.stream("Return", params))
    assert len(pieces) > 1 and "".join(pieces) == text[: text.find(stop)]  # nothing streamed was cut later


def test_tokens_does_not_detokenize_without_stop_strings(engines, monkeypatch):
    engine = engines["LlamaForCausalLM"]
    calls = []
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids: calls.append(1) or decode(ids))
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    steps = list(engine.tokens("The", params))
    assert len(steps) == 16 and calls == []
    full = engine.generate("The", params)
    assert calls and tuple(s[0] for s in steps) == full.token_ids


def test_tokens_with_stop_strings_detokenizes_and_ends_where_generate_does(engines, monkeypatch):
    engine = engines["GPT2LMHeadModel"]
    text = engine.generate("Return", SamplingParams(max_new_tokens=48, ignore_eos=True)).text
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, stop=text[10:13])
    c = engine.generate("Return", params)
    assert c.finish_reason == "stop"
    assert tuple(s[0] for s in engine.tokens("Return", params) if s[0] is not None) == c.token_ids


def test_stop_strings_without_a_tokenizer_are_refused(engines):
    engine = engines["LlamaForCausalLM"]
    bare = Engine(engine.directory, engine.manifest, engine.session, None)
    with pytest.raises(fastllm.InvalidParameterError, match="stop strings .* need a tokenizer.*stop_token_ids"):
        bare.generate([1, 2, 3], SamplingParams(max_new_tokens=4, stop="x"))

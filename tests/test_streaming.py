"""Streaming text, the incremental detokenizer, stop strings and stop ids, and sharing an engine between threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import fastllm
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

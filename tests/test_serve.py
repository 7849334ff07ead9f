"""`fastllm serve` as a real process on 127.0.0.1, driven by the official `openai` client (raw HTTP only for what the
client cannot send): a tiny Llama built and exported here, with a chat template written here, checked against the
same model loaded in this process. One assertion per protocol detail: shapes, usage, streaming, n, stop strings,
logprobs, seeds, every error status, disconnect, API key, queue full, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

import fastllm
from fastllm.bench.serve_process import ServerProcess
from fastllm.chat import ChatTemplate

CONTEXT = 4096  # long enough that a request cut off mid-stream could not have finished on its own
NAME = "tiny"
KEY = "sk-test-key"
# ChatML, refusing (raise_exception) a system message anywhere but first
TEMPLATE = """\
{% for message in messages %}
{% if message.role == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}{% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a class?"}]
EXACT = {"ignore_eos": True}  # lengths as asked: the random tiny model may draw EOS at any step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from fastllm.export import export_model
    from fastllm.export.tiny import build_tiny

    root = tmp_path_factory.mktemp("serve")
    hf = build_tiny("LlamaForCausalLM", root / "hf", tokenizer=tokenizer, max_context=CONTEXT)
    export_model(hf, root / NAME, graph="fused")
    (root / NAME / "chat_template.jinja").write_text(TEMPLATE)
    return root / NAME


@pytest.fixture(scope="module")
def bare_dir(model_dir, tmp_path_factory):
    """The same model without a chat template."""
    out = tmp_path_factory.mktemp("bare") / "bare"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("chat_template.jinja"))
    return out


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(model_dir, "--threads", "1", "--slots", "4", "--served-model-name", NAME) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(model_dir):
    e = fastllm.load(model_dir, threads=1)
    yield e
    e.close()


def params(engine, **fields):
    return engine.default_params(**fields)


def error_of(server, path: str, body) -> tuple[int, dict, dict]:
    status, headers, raw = server.post(path, body)
    return status, headers, json.loads(raw)["error"]


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- shapes and parity --------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (NAME, "model", "fastllm")
    assert server.get("/health")[0] == 200


def test_health_is_503_until_the_model_is_loaded(model_dir):
    from fastllm.serve.app import Server

    server = Server(model_dir)
    response = asyncio.run(server.health(None))
    assert response.status_code == 503 and response.headers["retry-after"]
    server.load()
    assert asyncio.run(server.health(None)).status_code == 200
    server.engine.close()


def test_completion_is_the_engines_with_exact_usage(client, engine):
    prompt = "The class statement"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body=EXACT)
    expect = engine.generate(prompt, params(engine, max_new_tokens=12, temperature=0, ignore_eos=True))
    (choice,) = r.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, expect.text, "length", None)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME and r.created > 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(engine.encode(prompt)), 12, len(engine.encode(prompt)) + 12)
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_every_prompt_form(client, engine):
    one = {"model": NAME, "max_tokens": 5, "temperature": 0, "extra_body": EXACT}
    texts = ["def f(x):", "A list is"]
    single = [client.completions.create(prompt=t, **one).choices[0].text for t in texts]
    batch = client.completions.create(prompt=texts, **one)
    assert [c.index for c in batch.choices] == [0, 1] and [c.text for c in batch.choices] == single
    assert batch.usage.prompt_tokens == sum(len(engine.encode(t)) for t in texts)
    assert batch.usage.completion_tokens == 10
    ids = [engine.encode(t) for t in texts]
    assert client.completions.create(prompt=ids[0], **one).choices[0].text == single[0]
    assert [c.text for c in client.completions.create(prompt=ids, **one).choices] == single


def test_chat_renders_the_template_and_matches_the_engine(client, engine, model_dir):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, extra_body=EXACT)
    text = ChatTemplate.from_directory(model_dir).render(MESSAGES)
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    expect = engine.generate(ids, params(engine, max_new_tokens=10, temperature=0, ignore_eos=True))
    (choice,) = r.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expect.text, "length")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)


# -- streaming ----------------------------------------------------------------------------------------------------
def create(client, kind: str, **fields):
    if kind == "chat":
        return client.chat.completions.create(model=NAME, messages=MESSAGES, **fields)
    return client.completions.create(model=NAME, prompt="import os", **fields)


def text_of(kind: str, choice) -> str:
    return choice.message.content if kind == "chat" else choice.text


def streamed(client, kind: str, **fields) -> tuple[dict[int, str], list]:
    chunks = list(create(client, kind, stream=True, **fields))
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = choice.delta.content if kind == "chat" else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts, chunks


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_equals_non_stream_with_usage_last(client, kind):
    fields = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 11, "extra_body": EXACT}
    whole = create(client, kind, **fields)
    texts, chunks = streamed(client, kind, stream_options={"include_usage": True}, **fields)
    assert texts == {0: text_of(kind, whole.choices[0])}
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in body) and len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert body[-1].choices[0].finish_reason == "length"
    if kind == "chat":
        assert body[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in body[1:])
        assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_without_include_usage_has_no_usage(client):
    _, chunks = streamed(client, "completion", max_tokens=4, temperature=0)
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_n_choices_sample_with_seed_plus_j(client, kind):
    fields = {"max_tokens": 8, "temperature": 1.0, "extra_body": EXACT}
    both = create(client, kind, n=2, seed=5, **fields)
    alone = [text_of(kind, create(client, kind, seed=5 + j, **fields).choices[0]) for j in range(2)]
    assert [c.index for c in both.choices] == [0, 1]
    assert [text_of(kind, c) for c in both.choices] == alone
    assert both.usage.completion_tokens == 16
    texts, _ = streamed(client, kind, n=2, seed=5, **fields)
    assert texts == dict(enumerate(alone))


def test_seed_makes_sampling_reproducible(client):
    fields = {"max_tokens": 12, "temperature": 1.0, "extra_body": EXACT}
    runs = [create(client, "completion", seed=seed, **fields).choices[0].text for seed in (3, 3, 4, 5, 6)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stop_strings_never_leak(client, kind):
    full = text_of(kind, create(client, kind, max_tokens=40, temperature=0, extra_body=EXACT).choices[0])
    stop = full[15:18]
    expect = full[: full.index(stop)]
    fields = {"max_tokens": 40, "temperature": 0, "stop": ["never-in-the-text", stop], "extra_body": EXACT}
    whole = create(client, kind, **fields).choices[0]
    assert (text_of(kind, whole), whole.finish_reason) == (expect, "stop")
    texts, chunks = streamed(client, kind, **fields)
    assert texts == {0: expect}
    pieces = [(c.choices[0].delta.content if kind == "chat" else c.choices[0].text) or "" for c in chunks]
    assert not any(stop in piece for piece in pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


# -- logprobs -----------------------------------------------------------------------------------------------------
def test_completion_logprobs_are_the_engines(client, engine):
    r = client.completions.create(model=NAME, prompt="for i in", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body=EXACT)
    lp = r.choices[0].logprobs
    expect = engine.generate("for i in", params(engine, max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    assert lp.tokens == [engine.tokenizer.decode([t.token_id]) for t in expect.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expect.logprobs], abs=1e-5)
    assert [len(top) for top in lp.top_logprobs] == [len({engine.tokenizer.decode([i]) for i, _ in t.top})
                                                     for t in expect.logprobs]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):  # greedy: the token is the top one
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]


def test_chat_logprobs_match_the_tokens_streamed_or_not(client):
    fields = {"max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2, "extra_body": EXACT}
    r = create(client, "chat", **fields)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.bytes == list(e.token.encode())
    _, chunks = streamed(client, "chat", **fields)
    stream = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in stream] == [(e.token, e.logprob) for e in content]


# -- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"seed": -3}, "seed"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"logit_bias": {"x": 3}}, "logit_bias"),
    ({"echo": True}, "echo"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_fields_are_400s_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", **{"max_tokens": 2, **fields})
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.message


def test_unsupported_chat_fields_are_refused_by_name(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[tool])
    assert e.value.body["param"] == "tools" and "tools" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"


def test_logit_bias_forces_and_bans_tokens(client, engine):
    forced = client.completions.create(model=NAME, prompt="x", max_tokens=3, logit_bias={"9": 100},
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    assert forced.choices[0].text == engine.tokenizer.decode([9, 9, 9])
    greedy = {"max_new_tokens": 4, "ignore_eos": True}
    first = engine.generate("x", greedy).token_ids[0]
    banned = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0,
                                       logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].text == engine.generate("x", {**greedy, "logit_bias": {first: -100}}).text
    assert engine.generate("x", {**greedy, "logit_bias": {first: -100}}).token_ids[0] != first


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"frobnicate": [1, 2]})
    assert r.usage.completion_tokens >= 1


def test_prompt_over_the_context_is_a_400_with_the_numbers(client, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="def f(", max_tokens=CONTEXT)
    n = len(engine.encode("def f("))
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(CONTEXT) in e.value.message and str(n) in e.value.message and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[5] * (CONTEXT + 1), max_tokens=1)
    assert str(CONTEXT + 1) in e.value.message


def test_bad_prompts_and_messages_are_400s(client):
    for prompt in ([10**6], [], [[1], "a"]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=prompt, max_tokens=2)
        assert e.value.body["param"] == "prompt"
    for messages in ([], [{"role": "robot", "content": "x"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
        assert e.value.body["param"] == "messages"


def test_a_template_raise_exception_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES[::-1], max_tokens=2)
    assert "the system message must come first" in e.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'{"prompt": "x", "temperature": NaN}',
                                  b'{"prompt": "\xff"}', b"[" * 100_000 + b"]" * 100_000])
def test_malformed_bodies_are_400_error_objects(server, body):
    status, _, error = error_of(server, "/v1/completions", body)
    assert status == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_paths_and_methods_are_error_objects(server):
    status, _, raw = server.get("/v1/nothing")
    assert status == 404 and "error" in json.loads(raw)
    status, _, raw = server.get("/v1/completions")
    assert status == 405 and "error" in json.loads(raw)


def test_fuzzed_bodies_get_only_4xx_and_the_server_still_answers(server, client):
    from fastllm.bench.serve_fuzz import fuzz

    before = client.completions.create(model=NAME, prompt="x = ", max_tokens=6, temperature=0).choices[0].text
    result = fuzz(server.url, bodies=1000, random_bodies=200, seed=1)
    assert all(400 <= status < 500 for status in result["invalid"]), result
    assert sum(result["invalid"].values()) == 1000
    assert all(0 < status < 500 for status in result["random"]), result
    after = client.completions.create(model=NAME, prompt="x = ", max_tokens=6, temperature=0).choices[0].text
    assert after == before and server.proc.poll() is None


def test_a_speculating_server_streams_the_engines_tokens(model_dir, engine):
    block = np.random.default_rng(0).integers(3, engine.manifest.vocab_size, size=12).tolist()
    prompt = block * 3 + block[:5]  # repeats itself, and the bias makes the tiny model repeat too: drafts are kept
    bias = {str(t): 6 for t in block[:2]}
    expect = engine.generate(prompt, params(engine, max_new_tokens=32, temperature=0, ignore_eos=True,
                                            logit_bias={t: 6 for t in block[:2]}))
    with ServerProcess(model_dir, "--threads", "1", "--slots", "1", "--speculative",
                       "--served-model-name", NAME) as s:
        spec = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = spec.completions.create(model=NAME, prompt=prompt, max_tokens=32, temperature=0, logit_bias=bias,
                                         stream=True, extra_body=EXACT)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expect.text
        metrics = s.metrics()
    assert metrics["fastllm_accepted_tokens_total"] > 0
    assert metrics["fastllm_speculative_steps_total"] <= metrics["fastllm_drafted_tokens_total"]


# -- disconnect and metrics ---------------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = server.metrics()
    limit = CONTEXT - 100
    stream = client.completions.create(model=NAME, prompt="while True:", max_tokens=limit, temperature=0, stream=True,
                                       extra_body=EXACT)
    next(iter(stream))
    assert server.metrics()["fastllm_slots_in_use"] == 1
    stream.close()
    assert wait_for(lambda: server.metrics()["fastllm_slots_in_use"] == 0)
    after = server.metrics()
    assert after["fastllm_requests_running"] == 0
    assert after["fastllm_requests_finished_total"] == before["fastllm_requests_finished_total"] + 1
    assert after["fastllm_generation_tokens_total"] - before["fastllm_generation_tokens_total"] < limit


def test_disconnect_while_prefilling_frees_the_slot(server, client):
    before = server.metrics()
    stream = client.completions.create(model=NAME, prompt=[7] * (CONTEXT - 300), max_tokens=200, stream=True,
                                       extra_body=EXACT)
    stream.close()  # as soon as the headers came: the prompt is still being prefilled, or just done
    assert wait_for(lambda: server.metrics()["fastllm_slots_in_use"] == 0)
    after = server.metrics()
    assert after["fastllm_requests_finished_total"] == before["fastllm_requests_finished_total"] + 1
    assert after["fastllm_generation_tokens_total"] - before["fastllm_generation_tokens_total"] < 200


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0, extra_body=EXACT)
    status, headers, body = server.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("fastllm_requests_running", "fastllm_requests_waiting", "fastllm_slots", "fastllm_slots_in_use",
                 "fastllm_prompt_tokens_total", "fastllm_generation_tokens_total", "fastllm_prefix_cache_hits_total",
                 "fastllm_time_to_first_token_seconds_bucket", "fastllm_time_per_output_token_seconds_bucket",
                 'fastllm_http_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text
    assert server.metrics()["fastllm_slots"] == 4


def test_prefix_cache_hits_show_in_usage(client):
    prompt = [9] * 600  # several blocks long, sent twice
    client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert 0 < r.usage.prompt_tokens_details.cached_tokens < 600


# -- the second server: API key, no chat template, one slot and a queue of one -------------------------------------
@pytest.fixture(scope="module")
def keyed(bare_dir):
    with ServerProcess(bare_dir, "--threads", "1", "--slots", "1", "--max-queue", "1", "--api-key", KEY,
                       "--served-model-name", NAME) as s:
        yield s


def test_api_key(keyed):
    def models(key):
        return openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=30).models.list()

    for key in ("wrong", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            models(key)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, _, raw = keyed.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert models(KEY).data[0].id == NAME
    assert keyed.get("/health")[0] == 200 and keyed.get("/metrics")[0] == 200  # open, as probes need them


def test_chat_without_a_template_says_what_to_do(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
    assert "/v1/completions" in e.value.message and "--chat-template" in e.value.message


def test_a_full_queue_is_503_with_retry_after(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    long = {"model": NAME, "prompt": "class A:", "max_tokens": CONTEXT - 100, "stream": True, "extra_body": EXACT}
    running = client.completions.create(**long)
    next(iter(running))  # in the one slot
    waiting = client.completions.create(**long)  # headers sent: submitted, waiting in the queue of one
    try:
        status, headers, raw = keyed.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                                          {"Authorization": f"Bearer {KEY}"})
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(raw)["error"]["code"] == "queue_full"
    finally:
        running.close()
        waiting.close()
    assert wait_for(lambda: keyed.metrics()["fastllm_requests_waiting"] == 0
                    and keyed.metrics()["fastllm_slots_in_use"] == 0)
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")

"""`fastllm serve --replicas 2 --threads 1`: a local Ray instance started by a real server process on 127.0.0.1, two
engine replicas behind one endpoint, driven by the official `openai` client. Checks: results equal the engine's,
both replicas serve, prompts sharing a 512-token prefix land on one replica (its prefix-cache hits in /metrics),
a client that goes away frees the replica's slot, and a replica killed mid-load is replaced while every request
either completes or gets an error. One Ray instance for the module; stopped (with its replicas) when it ends.
Skipped without the extra `ray`."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

import fastllm
from fastllm.bench.serve_process import ServerProcess

CONTEXT = 2048
NAME = "tiny"
EXACT = {"ignore_eos": True}  # lengths as asked: the random tiny model may draw EOS at any step
HEADER = "x-fastllm-replica"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from fastllm.export import export_model
    from fastllm.export.tiny import build_tiny

    root = tmp_path_factory.mktemp("ray")
    hf = build_tiny("LlamaForCausalLM", root / "hf", tokenizer=tokenizer, max_context=CONTEXT)
    export_model(hf, root / NAME, graph="fused")
    return root / NAME


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(model_dir, "--replicas", "2", "--threads", "1", "--slots", "4", "--served-model-name", NAME,
                       timeout=240) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(model_dir):
    e = fastllm.load(model_dir, threads=1)
    yield e
    e.close()


def total(server, name: str) -> float:
    return sum(m.get(name, 0.0) for m in server.replica_metrics().values())


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def complete(client, prompt, max_tokens: int):
    """(text, replica, cached tokens) of one greedy completion."""
    raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, extra_body=EXACT)
    r = raw.parse()
    return r.choices[0].text, raw.headers[HEADER], r.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("args, says", [
    (["--replicas", "2", "--num-cpus", "100000"], "need 200000 CPUs"),
    (["--autoscale", "3:1"], "MIN:MAX"),
    (["--replicas", "2", "--autoscale", "1:2"], "exclude each other"),
])
def test_bad_scale_options_are_refused_before_ray_starts(args, says):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastllm", "serve", *args], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode != 0 and says in out.stderr


def test_health_lists_both_replicas(server, client):
    status, _, body = server.get("/health")
    assert status == 200 and body.count(b'"replica"') == 2
    (card,) = client.models.list().data
    assert card.id == NAME
    assert len(server.replica_metrics()) == 2


def test_results_are_the_engines_and_both_replicas_serve(client, engine):
    prompts = [f"def f{i}(x):" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: complete(client, p, 24), prompts))
    for prompt, (text, _, _) in zip(prompts, results):
        expect = engine.generate(prompt, engine.default_params(max_new_tokens=24, temperature=0, ignore_eos=True))
        assert text == expect.text
    assert len({replica for _, replica, _ in results}) == 2


def test_stream_and_errors_are_the_apps(client, engine):
    stream = client.completions.create(model=NAME, prompt="class A:", max_tokens=10, temperature=0, stream=True,
                                       extra_body=EXACT)
    expect = engine.generate("class A:", engine.default_params(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == expect.text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_a_shared_512_token_prefix_lands_on_one_replica(server, client, engine):
    system = "".join(f"line {i}: keep the answer short and exact.\n" for i in range(200))
    ids = engine.encode(system)
    assert len(ids) >= 512
    prefix = engine.tokenizer.decode(ids[:512])
    before = {r: m["fastllm_prefix_cache_hits_total"] for r, m in server.replica_metrics().items()}
    served = [complete(client, prefix + f"\nquestion {i}: what is {i}?", 4) for i in range(6)]
    replicas = {replica for _, replica, _ in served}
    assert len(replicas) == 1
    assert all(cached >= 256 for _, _, cached in served[1:])
    (home,) = replicas
    after = server.replica_metrics()
    assert after[home]["fastllm_prefix_cache_hits_total"] - before[home] >= 5


def test_disconnect_cancels_on_the_replica(server, client):
    limit = CONTEXT - 100
    before = total(server, "fastllm_requests_finished_total")
    generated = total(server, "fastllm_generation_tokens_total")
    stream = client.completions.create(model=NAME, prompt="while True:", max_tokens=limit, temperature=0, stream=True,
                                       extra_body=EXACT)
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: total(server, "fastllm_requests_finished_total") == before + 1)
    assert total(server, "fastllm_slots_in_use") == 0
    assert total(server, "fastllm_generation_tokens_total") - generated < limit


def test_a_killed_replica_is_replaced_and_no_request_is_lost(server, client):
    """Last: it changes the replicas. 8 requests in flight on both replicas, one replica killed (SIGKILL): each
    request completes whole or raises an error; Ray starts a replica in its place, which then serves."""
    tokens = 300

    def one(i: int):
        try:
            stream = client.completions.create(model=NAME, prompt=f"def g{i}(y):", max_tokens=tokens, temperature=0,
                                               stream=True, extra_body=EXACT)
            chunks = [c for c in stream if c.choices]
            return "ok" if chunks[-1].choices[0].finish_reason == "length" else "cut"
        except openai.APIError:
            return "error"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        assert wait_for(lambda: all(m.get("fastllm_slots_in_use", 0) > 0 for m in server.replica_metrics().values()))
        metrics = server.replica_metrics()
        victim, survivor = sorted(metrics, key=lambda r: -metrics[r]["fastllm_slots_in_use"])
        os.kill(int(metrics[victim]["pid"]), signal.SIGKILL)
        outcomes = [f.result(timeout=120) for f in futures]
    assert "cut" not in outcomes  # never silently short
    assert outcomes.count("error") >= 1 and outcomes.count("ok") >= 1
    assert wait_for(lambda: len(server.replica_metrics()) == 2 and victim not in server.replica_metrics(), timeout=90)
    (new,) = set(server.replica_metrics()) - {survivor}

    def new_one_serves() -> bool:  # once the controller has told the router about it
        with ThreadPoolExecutor(8) as pool:
            return new in {r for _, r, _ in pool.map(lambda i: complete(client, f"def h{i}(z):", 24), range(8))}

    assert wait_for(new_one_serves, timeout=60)

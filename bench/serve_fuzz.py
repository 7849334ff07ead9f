"""Fuzz `fastllm serve` with malformed bodies and bad field values: every one must get a 4xx (never a 5xx, never a
hang), and the server must answer a normal request correctly afterwards. Loopback only, bounded.

    python -m fastllm.bench.serve_fuzz [MODEL_DIR] [--bodies 2000] [--seed 0]

Bodies (reproducible from the seed): bytes that are not a JSON object (random bytes, truncated JSON, JSON scalars
and arrays, NaN, non-UTF-8, deep nesting, empty), and valid requests with 1-3 fields set to values that are wrong
for them (types, ranges, unsupported features, an unknown model, a prompt past the context). A second set sends
random JSON values in random known fields, some of them valid: those may get a 200, never a 5xx.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import time

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# bad values per field, for both endpoints unless the field is one endpoint's own
BAD_COMMON = {
    "model": [1, [], {}, True, "no-such-model"],
    "max_tokens": [0, -1, 1.5, "3", True, [], 10**9],
    "temperature": [-1, -1e-9, "hot", [], True, {}],
    "top_p": [0, 1.5, -1, "x"],
    "top_k": [-2, 1.5, "x", [1]],
    "min_p": [-0.1, 1.1, "x"],
    "repetition_penalty": [0, -1, "x"],
    "presence_penalty": [2.5, -3, "x", True],
    "frequency_penalty": [2.5, -3, "x", []],
    "seed": [-1, 1.5, "x", True, [1]],
    "stop": [5, [1], [""], "", {"a": 1}, [None]],
    "stop_token_ids": [5, [-1], ["a"], "x", [1.5]],
    "ignore_eos": ["yes", 1, []],
    "n": [0, -1, 65, 1.5, "2", True],
    "stream": ["yes", 1, {}],
    "logit_bias": [{"1": 500}, {"x": 1}, {"99999999": 1}, {"1": "x"}, [1], "x"],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x"],
    "response_format": [{"type": "json_object"}, "json"],
    "best_of": [3, 0, "x"],
    "user": [5, [], {}],
}
BAD_COMPLETIONS = {
    "prompt": [None, "", [], [[]], [1, "a"], [-1], [10**12], {"a": 1}, 5, [[1], "a"], True, [True], [[1, 2], []]],
    "logprobs": [-1, 21, "x", True],
    "echo": [True],
    "suffix": ["x"],
}
BAD_CHAT = {
    "messages": [None, [], "hi", [{}], [{"role": "bogus", "content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [1],
                 [{"role": "user"}], [{"role": "user", "content": [{"type": "text"}]}]],
    "logprobs": ["yes", 1, []],
    "top_logprobs": [21, -1, "x"],
    "max_completion_tokens": [0, -5, "x"],
    "chat_template_kwargs": ["x", [], {"messages": 1}],
    "add_generation_prompt": ["x", 1],
}
# valid values that make a bad one reachable (stream_options needs stream, top_logprobs needs logprobs)
PAIRED = [({"stream": False, "stream_options": {"include_usage": True}}, ()),
          ({"stream": True, "stream_options": "x"}, ()),
          ({"stream": True, "stream_options": {"include_usage": "x"}}, ()),
          ({"top_logprobs": 3}, (CHAT,)), ({"logprobs": True, "top_logprobs": 30}, (CHAT,))]


def base_body(path: str) -> dict:
    if path == COMPLETIONS:
        return {"prompt": "def f(", "max_tokens": 2, "temperature": 0}
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def malformed(rng: random.Random) -> bytes:
    """Bytes that are not one JSON object."""
    kind = rng.randrange(9)
    valid = json.dumps(base_body(COMPLETIONS)).encode()
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return valid[: rng.randrange(1, len(valid) - 1)]
    if kind == 2:
        return json.dumps(rng.choice([1, -2.5, "text", None, True, [], [1, 2], [{"prompt": "x"}]])).encode()
    if kind == 3:
        return b'{"prompt": "x", "temperature": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity"]) + b"}"
    if kind == 4:
        return b'{"prompt": "' + bytes([rng.randrange(0x80, 0x100)]) + b'"}'
    if kind == 5:
        depth = rng.choice([1000, 100_000])
        return b"[" * depth + b"]" * depth
    if kind == 6:
        return b""
    if kind == 7:
        return valid.replace(b":", b"", 1)
    return b"{" + b'"a":' * rng.randrange(1, 50) + b"}"


def bad_body(rng: random.Random, path: str) -> dict:
    """A valid request with 1-3 fields set to values wrong for them."""
    body = base_body(path)
    if rng.random() < 0.1:
        pair, paths = rng.choice(PAIRED)
        if not paths or path in paths:
            return {**body, **pair}
    table = {**BAD_COMMON, **(BAD_COMPLETIONS if path == COMPLETIONS else BAD_CHAT)}
    for name in rng.sample(sorted(table), rng.randrange(1, 4)):
        value = rng.choice(table[name])
        if value is None and name not in ("prompt", "messages"):  # null means "not given": not a bad value
            value = "x"
        body[name] = value
    return body


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-5, 40)
    if kind == 3:
        return rng.uniform(-3, 3)
    if kind == 4:
        return "".join(rng.choice("ab \n\u00e9\u4e2d") for _ in range(rng.randrange(0, 6)))
    if kind == 5:
        return rng.choice([2**63, -(2**63), 1e300])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))]
    return {rng.choice(["a", "type", "role"]): random_value(rng, depth + 1)}


def random_body(rng: random.Random, path: str) -> dict:
    """Random JSON values in random known fields: some are valid requests (kept short), none may give a 5xx."""
    body = base_body(path)
    fields = sorted({**BAD_COMMON, **(BAD_COMPLETIONS if path == COMPLETIONS else BAD_CHAT)})
    for name in rng.sample(fields, rng.randrange(1, 4)):
        body[name] = random_value(rng)
    for name in ("max_tokens", "max_completion_tokens", "n"):
        if _is_int(body.get(name)) and body[name] > 4:  # a valid request stays cheap
            body[name] = 2
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> int:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def fuzz(url: str, *, bodies: int = 1000, random_bodies: int = 200, seed: int = 0) -> dict:
    """Send the bodies; statuses counted per set. The invalid set must be all 4xx, the random set < 500."""
    rng = random.Random(seed)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    invalid, rand, examples = {}, {}, []
    start = time.perf_counter()
    try:
        for i in range(bodies + random_bodies):
            path = rng.choice((COMPLETIONS, CHAT))
            if i < bodies:
                data = malformed(rng) if rng.random() < 0.3 else json.dumps(bad_body(rng, path)).encode()
            else:
                data = json.dumps(random_body(rng, path)).encode()
            try:
                status = post(conn, path, data)
            except (http.client.HTTPException, OSError):  # the server closed the connection: count it, reconnect
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            counts = invalid if i < bodies else rand
            counts[status] = counts.get(status, 0) + 1
            if (i < bodies and not 400 <= status < 500 or status >= 500 or status == 0) and len(examples) < 10:
                examples.append((path, status, data[:300].decode("utf-8", "replace")))
    finally:
        conn.close()
    return {"invalid": dict(sorted(invalid.items())), "random": dict(sorted(rand.items())), "examples": examples,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    from fastllm.bench.serve_process import ServerProcess

    p = argparse.ArgumentParser(prog="python -m fastllm.bench.serve_fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--bodies", type=int, default=2000, help="invalid bodies (default: 2000)")
    p.add_argument("--random-bodies", type=int, default=500, help="random-valued bodies (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with ServerProcess(args.model, "--threads", "2") as server:
        normal = {"prompt": "def f(", "max_tokens": 8, "temperature": 0}
        before = json.loads(server.post(COMPLETIONS, normal)[2])["choices"][0]["text"]
        result = fuzz(server.url, bodies=args.bodies, random_bodies=args.random_bodies, seed=args.seed)
        status, _, body = server.post(COMPLETIONS, normal)
        after = json.loads(body)["choices"][0]["text"] if status == 200 else None
        alive = server.proc.poll() is None
    ok_invalid = all(400 <= s < 500 for s in result["invalid"])
    ok_random = all(0 < s < 500 for s in result["random"])
    print(f"invalid bodies: {sum(result['invalid'].values())} -> statuses {result['invalid']}")
    print(f"random bodies:  {sum(result['random'].values())} -> statuses {result['random']}")
    print(f"{result['seconds']:.1f} s; server alive: {alive}; normal request after: "
          f"{'same text as before' if after == before else 'DIFFERENT'}")
    for example in result["examples"]:
        print("  example:", example)
    return 0 if ok_invalid and ok_random and alive and after == before else 1


if __name__ == "__main__":
    raise SystemExit(main())

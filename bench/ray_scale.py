"""Scale-out on Ray Serve, on loopback: `fastllm serve` alone against `--replicas 1` and `--replicas 2` (1 thread
each), driven by the official `openai` client.

    python -m fastllm.bench.ray_scale [--models bundled smollm2] [--out DIR]

Per model:
  throughput   8 concurrent streams, each `--requests` greedy completions of `--max-tokens` tokens: aggregate output
               tokens/s and TTFT p50, for the plain server, 1 replica and 2 replicas
  overhead     what Ray adds per replica: the round trip of a 1-token request (median of 20, sequential), the
               replica process's RSS against the plain server's, and the RSS of Ray's own processes
  prefix       64 requests sharing 4 system prompts (16 each, shuffled, 8 at a time, 8 tokens out) on 2 replicas,
               routed by prefix affinity and round-robin, with the default slots (16) and with 4 slots per replica
               (fewer finished slots to keep prefixes in): prefix-cache hits per request, the share of prompt tokens
               reused, and the wall time of the 64
Bounded: every request has a timeout; each server is stopped (its Ray with it) before the next starts. Before each
server the run waits (a few tries) for the load average to fall below --max-load and records what it was.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STREAMS = 8
MODELS = {"bundled": None, "smollm2": "runs/bench/models/smollm2-135m/fastllm-fused-int4"}


def load_average() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, tries: int, pause: float) -> float:
    for _ in range(tries):
        if load_average() < max_load:
            break
        time.sleep(pause)
    return round(load_average(), 2)


def tree(root: int) -> list[int]:
    """root and every process below it (Ray's head processes and workers descend from the server process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss(root: int) -> int:
    from fastllm.bench.serve_process import rss_bytes

    total = 0
    for pid in tree(root):
        try:
            total += rss_bytes(pid)
        except (OSError, RuntimeError):
            pass
    return total


def counters(server) -> dict[str, float]:
    """Engine counters summed over replicas (or the plain server's own)."""
    names = ("fastllm_prefix_cache_hits_total", "fastllm_prefix_cached_tokens_total", "fastllm_prompt_tokens_total",
             "fastllm_generation_tokens_total")
    per = server.replica_metrics()
    if per:
        return {n: sum(m.get(n, 0.0) for m in per.values()) for n in names}
    plain = server.metrics()
    return {n: plain.get(n, 0.0) for n in names}


def stream_one(client, model: str, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, TTFT s, total s) of one greedy streamed completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return tokens, (first or end) - start, end - start


def throughput(client, model: str, requests: int, max_tokens: int) -> dict:
    def worker(s: int) -> list:
        return [stream_one(client, model, f"def function_{s}_{k}(x):", max_tokens) for k in range(requests)]

    stream_one(client, model, "def warm(x):", 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        results = [r for rs in pool.map(worker, range(STREAMS)) for r in rs]
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {"streams": STREAMS, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(r[1] for r in results), 1)}


def round_trip(client, model: str, n: int = 20) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        client.completions.create(model=model, prompt=f"x{i}", max_tokens=1, temperature=0)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def system_prompts(engine_tokens, tokens: int) -> list[str]:
    """4 system prompts of about `tokens` tokens each, different from their first line."""
    prompts = []
    for p in range(4):
        text, i = f"System prompt {p}: you are assistant number {p}.\n", 0
        while len(engine_tokens(text)) < tokens:
            text += f"Rule {p}.{i}: answer question {i} of kind {p} briefly and exactly.\n"
            i += 1
        prompts.append(text)
    return prompts


def prefix_workload(client, model: str, prompts: list[str], server) -> dict:
    jobs = [(p, q) for p in range(4) for q in range(16)]
    random.Random(0).shuffle(jobs)
    before = counters(server)
    start = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        list(pool.map(lambda j: stream_one(client, model, prompts[j[0]] + f"Question {j[1]}: what is {j[1]}?", 8),
                      jobs))
    wall = time.perf_counter() - start
    time.sleep(0.5)
    after = counters(server)
    hits = after["fastllm_prefix_cache_hits_total"] - before["fastllm_prefix_cache_hits_total"]
    cached = after["fastllm_prefix_cached_tokens_total"] - before["fastllm_prefix_cached_tokens_total"]
    prompt = after["fastllm_prompt_tokens_total"] - before["fastllm_prompt_tokens_total"]
    per = {r: m.get("fastllm_prefix_cache_hits_total", 0.0) for r, m in server.replica_metrics().items()}
    return {"requests": len(jobs), "hits": int(hits), "hit_rate": round(hits / len(jobs), 3),
            "cached_token_share": round(cached / prompt, 3) if prompt else 0.0, "hits_by_replica": per,
            "wall_s": round(wall, 2)}


def run_model(name: str, model_dir: str | None, args) -> dict:
    import openai

    import fastllm
    from fastllm.bench.serve_process import ServerProcess, rss_bytes
    from fastllm.cli import default_model

    model_dir = model_dir or default_model()
    engine = fastllm.load(model_dir, threads=1)
    context = engine.context
    prompts = system_prompts(engine.encode, min(600, context - 200))
    prompt_tokens = len(engine.encode(prompts[0]))
    engine.close()
    served = "m"
    rr = ["--router", "round-robin"]
    # (label, server options, workloads): t = throughput, o = 1-token round trip, p = prefix
    configs = [("plain", [], "to"), ("ray-1", ["--replicas", "1"], "to"), ("ray-2", ["--replicas", "2"], "tp"),
               ("ray-2-round-robin", ["--replicas", "2", *rr], "p"),
               ("ray-2-slots4", ["--replicas", "2", "--slots", "4"], "p"),
               ("ray-2-slots4-round-robin", ["--replicas", "2", "--slots", "4", *rr], "p")]
    out = {"model": str(model_dir), "context": context, "system_prompt_tokens": prompt_tokens, "runs": {}}
    for label, extra, work in configs:
        load_before = wait_quiet(args.max_load, args.tries, args.pause)
        with ServerProcess(model_dir, "--threads", "1", "--served-model-name", served, *extra, timeout=300) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            run: dict = {"load_before": load_before}
            if "t" in work:
                run["throughput"] = throughput(client, served, args.requests, args.max_tokens)
            if "o" in work:
                run["round_trip_1_token_ms"] = round_trip(client, served)
            if "p" in work:
                run["prefix"] = prefix_workload(client, served, prompts, s)
            per = s.replica_metrics()
            run["rss_mb"] = {"server_tree": round(tree_rss(s.proc.pid) / 2**20, 1),
                             "replicas": [round(rss_bytes(int(m["pid"])) / 2**20, 1) for m in per.values()] if per
                             else None}
            run["load_after"] = round(load_average(), 2)
        out["runs"][label] = run
        print(name, label, json.dumps(run), flush=True)
    return out


def summary(results: dict) -> str:
    lines = [("| model | config | tokens/s (8 streams) | TTFT p50 ms | 1-token round trip ms | prefix hit rate "
             "| cached prompt share | prefix wall s | RSS MB (tree / replicas) | load before |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        for label, run in r["runs"].items():
            t, p = run.get("throughput", {}), run.get("prefix", {})
            lines.append(f"| {name} | {label} | {t.get('tokens_per_s', '')} | {t.get('ttft_p50_ms', '')} "
                         f"| {run.get('round_trip_1_token_ms', '')} | {p.get('hit_rate', '')} "
                         f"| {p.get('cached_token_share', '')} | {p.get('wall_s', '')} | {run['rss_mb']['server_tree']} / "
                         f"{run['rss_mb']['replicas'] or '-'} | {run['load_before']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fastllm.bench.machine import machine, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--requests", type=int, default=4, help="requests per stream (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a load average below this (default 1.5)")
    p.add_argument("--tries", type=int, default=6, help="how many times to wait --pause s for it (default 6)")
    p.add_argument("--pause", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=None, help="folder for ray_scale.json and ray_scale.md")
    args = p.parse_args(argv)
    results = {"machine": machine(), "versions": versions(), "models": {}}
    for name in args.models:
        path = MODELS[name]
        if path is not None and not Path(path).exists():
            print(f"{name}: {path} is not here; skipped", flush=True)
            continue
        results["models"][name] = run_model(name, path, args)
    table = summary(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray_scale.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "ray_scale.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

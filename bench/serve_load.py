"""Load test of `fastllm serve` on loopback: N concurrent streaming clients (the official `openai` client), each a
sampled completion of a fixed length, in rounds. Reports errors, aggregate output tokens/s, TTFT and TPOT
percentiles as the clients see them, and the server's RSS after each round (it must not grow).

    python -m fastllm.bench.serve_load [MODEL_DIR] [--clients 100] [--max-tokens 64] [--rounds 3] [--threads 2]
        [--json out.json]

Bounded: every request has a timeout and the whole run stops after --deadline seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_client(client, model: str, index: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    pieces = tokens = 0
    stream = await client.completions.create(
        model=model, prompt=f"def function_{index}(", max_tokens=max_tokens, temperature=0.8, seed=index,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            pieces += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("no text streamed")
    return {"ttft": first - start, "tpot": (last - first) / (pieces - 1) if pieces > 1 else 0.0, "tokens": tokens,
            "seconds": last - start}


async def one_round(url: str, model: str, clients: int, max_tokens: int, timeout: float) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, model, i, max_tokens) for i in range(clients)),
                                   return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    tokens = sum(r["tokens"] for r in ok)
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok]
    return {"clients": clients, "ok": len(ok), "errors": len(errors), "error_examples": errors[:3],
            "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpot, 50), "tpot_p95_s": percentile(tpot, 95),
            "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan")}


def main(argv: list[str] | None = None) -> int:
    from fastllm.bench.serve_process import ServerProcess

    p = argparse.ArgumentParser(prog="python -m fastllm.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round (default: 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=1500.0, help="whole run, seconds")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    extra = ["--threads", str(args.threads), "--served-model-name", "m"]
    if args.slots:
        extra += ["--slots", str(args.slots)]
    started = time.perf_counter()
    with ServerProcess(args.model, *extra) as server:
        rss = {"loaded": server.rss_bytes()}
        warm = asyncio.run(one_round(server.url, "m", args.clients, args.max_tokens, args.timeout))
        rss["after_warmup"] = server.rss_bytes()
        rounds = []
        for i in range(args.rounds):
            if time.perf_counter() - started > args.deadline:
                break
            rounds.append(asyncio.run(one_round(server.url, "m", args.clients, args.max_tokens, args.timeout)))
            rss[f"after_round_{i + 1}"] = server.rss_bytes()
        metrics = server.metrics()
    growth = max(rss.values()) / rss["after_warmup"] - 1
    result = {"warmup": warm, "rounds": rounds, "rss_bytes": rss, "rss_growth_after_warmup": growth,
              "server_slots": metrics.get("fastllm_slots"),
              "server_generated_tokens": metrics.get("fastllm_generation_tokens_total")}
    for name, r in [("warm-up", warm)] + [(f"round {i + 1}", r) for i, r in enumerate(rounds)]:
        print(f"{name}: {r['ok']}/{r['clients']} ok, {r['errors']} errors, {r['output_tokens']} tokens in "
              f"{r['wall_s']:.1f} s = {r['tokens_per_s']:.0f} tok/s; TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms "
              f"p95 {r['ttft_p95_s'] * 1e3:.0f} ms p99 {r['ttft_p99_s'] * 1e3:.0f} ms; TPOT p50 "
              f"{r['tpot_p50_s'] * 1e3:.1f} ms p95 {r['tpot_p95_s'] * 1e3:.1f} ms")
        for example in r["error_examples"]:
            print("   error:", example)
    print("RSS MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in rss.items())
          + f"; growth after warm-up {growth:+.2%}; slots {result['server_slots']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    errors = warm["errors"] + sum(r["errors"] for r in rounds)
    return 0 if errors == 0 and growth <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a serving step's time goes: one decode forward over M rows and one prefill chunk of C positions, timed
alone through the engine's own slot bindings (fastllm.scheduler), so the batching targets can be read against
what the kernels allow.

    .venv/bin/python -m fastllm.bench.step_profile MODEL_DIR [MODEL_DIR ...] --threads 2 --rows 1,2,4,8,16
        --chunks 64,128,256,512 --position 128 [--json OUT.json]

Decode: M rows at position `--position` each (their KV is whatever the buffer holds: the cost does not depend on
the values), the median of `--repeat` forwards; reported per step and per row (tokens/s = M / step). Prefill: one
chunk of C positions at the start of a slot, per token. Nothing here samples or detokenizes: that is the scheduler's
own overhead, which the serving benchmark includes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import fastllm
from fastllm.bench.machine import machine


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(directory: Path, *, threads: int, rows: list[int], chunks: list[int], position: int,
            repeat: int) -> dict:
    engine = fastllm.load(directory, threads=threads, slots=max(rows), context=max(max(chunks), position) + 64)
    scheduler = engine._scheduler
    scheduler._start()  # the KV buffers and bindings the loop would use; the loop thread is never started
    vocab = engine.manifest.vocab_size
    result = {"model": str(directory), "precision": engine.manifest.precision, "threads": threads,
              "position": position, "decode": [], "prefill": []}
    for m in rows:
        binding = engine.session.ort.io_binding()
        scheduler.kv.bind(binding, 0, m)
        logits = np.empty((m, 1, vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        feeds = {"input_ids": np.full((m, 1), 7, dtype=np.int64),
                 "position_ids": np.full((m, 1), position, dtype=np.int64),
                 "seqlens_k": np.full(m, position, dtype=np.int32),
                 "total_sequence_length": np.array(position + 1, dtype=np.int32)}
        step = _median_time(lambda b=binding, f=feeds: scheduler._run(b, f), repeat)
        result["decode"].append({"rows": m, "step_ms": step * 1e3, "tokens_per_s": m / step})
    for c in chunks:
        binding = engine.session.ort.io_binding()
        scheduler.kv.bind(binding, 0, 1)
        logits = np.empty((1, 1, vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        feeds = {"input_ids": np.full((1, c), 7, dtype=np.int64),
                 "position_ids": np.arange(c, dtype=np.int64)[None],
                 "seqlens_k": np.array([c - 1], dtype=np.int32),
                 "total_sequence_length": np.array(c, dtype=np.int32)}
        step = _median_time(lambda b=binding, f=feeds: scheduler._run(b, f), max(3, repeat // 4))
        result["prefill"].append({"chunk": c, "step_ms": step * 1e3, "ms_per_token": step * 1e3 / c,
                                  "tokens_per_s": c / step})
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--chunks", default="64,128,256,512")
    p.add_argument("--position", type=int, default=128)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    report = {"machine": machine(), "results": []}
    print(f"# {report['machine'].get('cpu', '?')}, {args.threads} threads, decode rows at position {args.position}")
    for directory in args.models:
        r = profile(directory, threads=args.threads, rows=rows, chunks=chunks, position=args.position,
                    repeat=args.repeat)
        report["results"].append(r)
        one = r["decode"][0]["tokens_per_s"]
        print(f"\n## {directory} ({r['precision']})\n")
        print("| decode rows | step ms | tokens/s | x one row |\n|---|---|---|---|")
        for d in r["decode"]:
            print(f"| {d['rows']} | {d['step_ms']:.2f} | {d['tokens_per_s']:.0f} | {d['tokens_per_s'] / one:.2f} |")
        print("\n| prefill chunk | step ms | ms/token | tokens/s |\n|---|---|---|---|")
        for q in r["prefill"]:
            print(f"| {q['chunk']} | {q['step_ms']:.1f} | {q['ms_per_token']:.3f} | {q['tokens_per_s']:.0f} |")
    if args.json:
        if args.json.exists():
            raise SystemExit(f"{args.json} exists; give a new file")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

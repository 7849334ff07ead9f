"""Where one decode step and one prefill spend their time, per operator type, from ONNX Runtime's own profiler.

    .venv/bin/python -m fastllm.bench.op_profile MODEL_DIR [MODEL_DIR ...] --threads 2 --prompt 128 --steps 32
        [--json OUT.json] [--markdown OUT.md]

Each model directory is loaded by fastllm as it always is, with FASTLLM_ORT_PROFILE set (fastllm.session), and
runs: one prompt of `--prompt` random ids with one new token (warm-up), the same again (the prefill measured), and
the same prompt with `--steps` + 1 new tokens, whose last `--steps` forwards are the decode steps measured (greedy).
Every forward is one "model_run" event in the profile; the kernels inside it are attributed to it by time. Per op
type: milliseconds per decode step (mean over the steps) and per prefill, and the share of the forward. "outside
kernels" is the forward's time not inside any kernel: ONNX Runtime's own work between them (allocation, thread
hand-off, the binding's copies). The sampler runs outside the graph and is not in these figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

import fastllm
from fastllm.bench.machine import machine
from fastllm.session import PROFILE_ENV


def _runs(events: list[dict]) -> list[dict]:
    """model_run events in time order, each with its kernels' time per op type (microseconds)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    out, k = [], 0
    for run in runs:
        start, stop = run["ts"], run["ts"] + run["dur"]
        ops: dict[str, float] = defaultdict(float)
        while k < len(kernels) and kernels[k]["ts"] < start:
            k += 1
        while k < len(kernels) and kernels[k]["ts"] < stop:
            ops[kernels[k]["args"].get("op_name", "?")] += kernels[k]["dur"]
            k += 1
        out.append({"us": run["dur"], "ops": dict(ops)})
    return out


def _summary(runs: list[dict]) -> dict:
    """Mean per run: total, per op type, and outside kernels (milliseconds)."""
    n = len(runs)
    ops: dict[str, float] = defaultdict(float)
    for run in runs:
        for name, us in run["ops"].items():
            ops[name] += us / n / 1e3
    total = sum(r["us"] for r in runs) / n / 1e3
    return {"forward_ms": total, "runs": n, "kernels_ms": sum(ops.values()),
            "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "outside_kernels_ms": total - sum(ops.values())}


def profile(directory: Path, *, threads: int, prompt: int, steps: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastllm-profile-") as tmp:
        previous = os.environ.get(PROFILE_ENV)
        os.environ[PROFILE_ENV] = str(Path(tmp) / "ort")
        try:
            engine = fastllm.load(directory, threads=threads, prefix_cache=False)  # every prefill computed
        finally:
            if previous is None:
                os.environ.pop(PROFILE_ENV, None)
            else:
                os.environ[PROFILE_ENV] = previous
        vocab = engine.manifest.vocab_size
        ids = np.random.default_rng(seed).integers(3, vocab, size=prompt).tolist()
        for new in (1, 1, steps + 1):
            engine.generate(ids, fastllm.SamplingParams(max_new_tokens=new, ignore_eos=True))
        path = engine.session.ort.end_profiling()
        manifest = engine.manifest
        engine.close()
        del engine
        gc.collect()
        runs = _runs(json.loads(Path(path).read_text()))
    per_prompt = (len(runs) - steps) // 3  # forwards of one prefill (chunks), the same in each of the three calls
    if per_prompt < 1 or 3 * per_prompt + steps != len(runs):
        raise RuntimeError(f"{directory}: {len(runs)} forwards in the profile, expected 3 prefills and {steps} steps")
    prefill = runs[per_prompt:2 * per_prompt]
    prefill_sum = {"us": sum(r["us"] for r in prefill), "ops": defaultdict(float)}
    for r in prefill:
        for name, us in r["ops"].items():
            prefill_sum["ops"][name] += us
    return {"model_dir": str(directory), "graph": manifest.graph.kind, "precision": manifest.precision,
            "quantization": manifest.quantization, "threads": threads, "prompt": prompt, "steps": steps,
            "prefill_forwards": per_prompt, "decode": _summary(runs[-steps:]), "prefill": _summary([prefill_sum])}


def markdown(results: list[dict], *, top: int = 8) -> str:
    lines = []
    for r in results:
        name = f"{Path(r['model_dir']).parent.name}/{Path(r['model_dir']).name}"
        for phase, label in (("decode", f"decode step (mean of {r['steps']})"),
                             ("prefill", f"prefill of {r['prompt']} tokens")):
            s = r[phase]
            parts = [f"{op} {ms:.2f} ({100 * ms / s['forward_ms']:.0f}%)"
                     for op, ms in list(s["ops_ms"].items())[:top]]
            parts.append(f"outside kernels {s['outside_kernels_ms']:.2f} "
                         f"({100 * s['outside_kernels_ms'] / s['forward_ms']:.0f}%)")
            lines.append(f"| {name} | {r['precision']} | {label} | {s['forward_ms']:.2f} | {'; '.join(parts)} |")
    header = "| model | precision | forward | ms | per op type, ms (share of the forward) |"
    return "\n".join([header, "|---|---|---|---|---|", *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastllm.bench.op_profile", description=__doc__.splitlines()[0])
    p.add_argument("model_dirs", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    for out in (args.json, args.markdown):
        if out is not None and out.exists():
            p.error(f"{out} already exists; choose another file")
    results = [profile(d, threads=args.threads, prompt=args.prompt, steps=args.steps) for d in args.model_dirs]
    text = markdown(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

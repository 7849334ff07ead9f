"""The serving benchmark as a whole: for each shape, build (or re-use) its fastllm models, then measure each one in a
worker process of its own (bench.serving), and put the results together with the ratios issue 12 sets targets for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastllm.bench import shapes as shape_registry
from fastllm.bench.engines import fastllm_spec, size_on_disk
from fastllm.bench.errors import BenchError
from fastllm.bench.machine import machine, versions
from fastllm.bench.runner import Progress, _clock, stderr_progress
from fastllm.bench.serving import ServingWorkload
from fastllm.bench.workers import worker_env

RESULTS_FORMAT = "fastllm-bench-serving/1"
# issue 12's targets on the smollm2-135m shape, 2 threads: decode tokens/s at 8 streams over 1 stream (by precision),
# TTFT p95 at 8 streams over the single-stream TTFT, and cached-prefix TTFT over uncached
DECODE_TARGETS = {"fp32": 4.0, "int4": 3.0}
TTFT_TARGET = 3.0
PREFIX_TARGET = 0.15
TARGET_CONCURRENCY = 8


@dataclass(frozen=True)
class ServingOptions:
    shapes: tuple[str, ...]
    workload: ServingWorkload = field(default_factory=ServingWorkload)
    model_dirs: tuple[str, ...] = ()  # extra fastllm model directories, measured after the built ones
    graphs: tuple[str, ...] = ("fused",)  # the fused graph is the one continuous batching serves
    precisions: tuple[str, ...] = ("fp32",)
    work_dir: str = "runs/bench"
    timeout_s: float | None = None  # per worker process

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(dict.fromkeys(self.shapes)))
        shape_registry.check(self.shapes, self.precisions)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(options: ServingOptions, *, progress: Progress = stderr_progress) -> dict:
    """Run the serving benchmark; returns the results (what results.json holds)."""
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": {**machine(), "load_average_start": _load_average()},
        "versions": versions(),
        "workload": options.workload.to_dict(),
        "targets": {"decode_vs_1": DECODE_TARGETS, "ttft_p95_vs_1": TTFT_TARGET, "prefix_ttft_ratio": PREFIX_TARGET,
                    "concurrency": TARGET_CONCURRENCY},
        "shapes": [],
        "notes": [],
    }
    started = time.perf_counter()
    for name in options.shapes:
        results["shapes"].append(_run_shape(name, options, results["notes"], started, progress))
    results["machine"]["load_average_end"] = _load_average()
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _run_shape(name: str, options: ServingOptions, notes: list[str], started: float, progress: Progress) -> dict:
    from fastllm.manifest import Manifest

    workload = options.workload
    shape = shape_registry.get(name)
    built = shape_registry.build(shape, options.work_dir, graphs=options.graphs, precisions=options.precisions,
                                 threads=workload.threads, progress=progress)
    dirs = [*built.fastllm_dirs, *(Path(d) for d in options.model_dirs)]
    context = min([shape.max_context] + [Manifest.read(d).max_context for d in dirs])
    if workload.context_needed() > context:
        raise BenchError(f"{name}: a request needs {workload.context_needed()} positions (prompt "
                         f"{workload.prompt_length} + {workload.new_tokens} new tokens, prefix measurement "
                         f"{workload.prefix_length} + {workload.prefix_suffix} + {workload.prefix_new_tokens}) but the "
                         f"context is {context}; lower --prompt-lengths, --new-tokens or --prefix-length")
    rows = []
    for d in dirs:
        spec = fastllm_spec(d)
        t0 = time.perf_counter()
        progress(f"{_clock(started)} {name} | {spec.label} | serving: concurrency "
                 f"{','.join(map(str, workload.concurrency))} ...")
        result = run_worker(str(d), workload, timeout_s=options.timeout_s)
        row = {"label": spec.label, "precision": spec.precision, "model_path": str(d),
               "model_size_bytes": size_on_disk(d), **result}
        if "error" not in row:
            add_ratios(row)
            if row["api"] != "submit":
                notes.append(f"{name}: {spec.label}: the engine has no submit(), so each request ran its own "
                             "decode loop (Engine.steps in a thread per request): no continuous batching")
        rows.append(row)
        progress(f"{_clock(started)} {name} | {spec.label} | {_brief(row)} | {time.perf_counter() - t0:.1f} s")
    return {"name": name, "architecture": shape.architecture, "parameters": built.parameters,
            "max_context": context, "results": rows}


def run_worker(model_path: str, workload: ServingWorkload, *, timeout_s: float | None = None) -> dict:
    job = {"model_path": model_path, "workload": workload.to_dict()}
    job["workload"].pop("engine_slots")
    with tempfile.TemporaryDirectory(prefix="fastllm-serving-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        command = [sys.executable, "-m", "fastllm.bench.serving", str(job_path), str(result_path)]
        try:
            done = subprocess.run(command, env=worker_env(workload.threads), capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited with status {done.returncode}: {tail[0]}"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(row: dict) -> None:
    """Per concurrency, against the single stream (concurrency 1) of the same model: decode tokens/s over one
    stream's, TTFT p95 over one stream's TTFT (p50); and the targets at TARGET_CONCURRENCY."""
    for kind in ("together", "poisson"):
        levels = row.get(kind) or []
        single = next((e for e in levels if e["concurrency"] == 1), None)
        for entry in levels:
            if kind == "together":
                entry["decode_vs_1"] = _ratio(entry["decode_tok_s"], single and single["decode_tok_s"])
            entry["output_vs_1"] = _ratio(entry["output_tok_s"], single and single["output_tok_s"])
            entry["ttft_p95_vs_1"] = _ratio(entry["ttft_p95_s"], single and single["ttft_p50_s"])
    at = next((e for e in row.get("together") or [] if e["concurrency"] == TARGET_CONCURRENCY), None)
    decode_target = DECODE_TARGETS.get(row["precision"])
    prefix = row.get("prefix")
    row["targets"] = {
        "decode_vs_1": at and at["decode_vs_1"],
        "decode_vs_1_target": decode_target,
        "decode_vs_1_met": None if at is None or at["decode_vs_1"] is None or decode_target is None
        else at["decode_vs_1"] >= decode_target,
        "ttft_p95_vs_1": at and at["ttft_p95_vs_1"],
        "ttft_p95_vs_1_met": None if at is None or at["ttft_p95_vs_1"] is None else at["ttft_p95_vs_1"] <= TTFT_TARGET,
        "prefix_ttft_ratio": prefix and prefix["ratio"],
        "prefix_ttft_ratio_met": None if not prefix else prefix["ratio"] <= PREFIX_TARGET,
    }


def _brief(row: dict) -> str:
    if "error" in row:
        return f"FAILED: {row['error']}"
    parts = [f"api {row['api']}"]
    for entry in row.get("together") or []:
        rate = entry["decode_tok_s"]
        parts.append(f"c{entry['concurrency']} {entry['output_tok_s']:.0f} out tok/s"
                     + (f" {rate:.0f} decode tok/s" if rate else ""))
    if row.get("prefix"):
        parts.append(f"prefix TTFT ratio {row['prefix']['ratio']:.2f}")
    return ", ".join(parts)

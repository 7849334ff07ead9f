"""A whole benchmark: for each shape, build (or re-use) its models, then for every case run every engine in its own
process, interleaving engines case by case so slow drift of the machine does not favour one of them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastllm.bench import shapes as shape_registry
from fastllm.bench.engines import ENGINE_NAMES, REFERENCE, EngineSpec, prepare, resolve, size_on_disk
from fastllm.bench.errors import BenchError
from fastllm.bench.machine import machine, versions
from fastllm.bench.workers import run_worker
from fastllm.bench.workload import Workload

RESULTS_FORMAT = "fastllm-bench/1"
Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchOptions:
    shapes: tuple[str, ...]
    workload: Workload = field(default_factory=Workload)
    engines: tuple[str, ...] = ENGINE_NAMES
    model_dirs: tuple[str, ...] = ()  # extra fastllm model directories, each timed with the shape it matches
    graphs: tuple[str, ...] = ("fused", "portable")  # graph kinds exported and timed for each shape
    precisions: tuple[str, ...] = ("fp32",)  # per graph kind: fp32 and/or quantized (bench.shapes.PRECISIONS)
    work_dir: str = "runs/bench"  # models are cached under <work_dir>/models/<shape>
    timeout_s: float | None = None  # per worker process

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(dict.fromkeys(self.shapes)))
        object.__setattr__(self, "engines", tuple(dict.fromkeys(self.engines)))
        object.__setattr__(self, "model_dirs", tuple(str(d) for d in self.model_dirs))
        shape_registry.check(self.shapes, self.precisions)
        unknown = [e for e in self.engines if e not in ENGINE_NAMES]
        if unknown or not self.engines:
            raise BenchError(f"engines must be a non-empty comma-separated list of {ENGINE_NAMES}, got "
                             f"{list(self.engines)!r}")
        if self.model_dirs and "fastllm" not in self.engines:
            raise BenchError("--model-dir was given but 'fastllm' is not in --engines; add it")


def _matching_shape(model_dir: str, names: tuple[str, ...]) -> str:
    from fastllm.manifest import Manifest

    m = Manifest.read(model_dir)
    for name in names:
        config = shape_registry.get(name).hf_config()
        if (m.architecture, m.num_layers, m.hidden_size, m.vocab_size) == (
                config.architectures[0], config.num_hidden_layers, config.hidden_size, config.vocab_size):
            return name
    raise BenchError(f"model directory {model_dir} ({m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
                     f"vocab {m.vocab_size}) matches none of the shapes given ({', '.join(names)}); add --shape for "
                     f"its shape (known: {', '.join(sorted(shape_registry.SHAPES))})")


def run(options: BenchOptions, *, progress: Progress = stderr_progress) -> dict:
    """Run the benchmark; returns the results (what results.json holds)."""
    extra_dirs = {name: [] for name in options.shapes}
    for d in options.model_dirs:
        extra_dirs[_matching_shape(d, options.shapes)].append(Path(d))
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": machine(),
        "versions": versions(),
        "workload": options.workload.to_dict(),
        "reference": REFERENCE,
        "shapes": [],
        "notes": [],
    }
    started = time.perf_counter()
    for name in options.shapes:
        results["shapes"].append(_run_shape(name, extra_dirs[name], options, results["notes"], started, progress))
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _run_shape(name: str, extra_dirs: list[Path], options: BenchOptions, notes: list[str], started: float,
               progress: Progress) -> dict:
    from fastllm.manifest import Manifest

    workload = options.workload
    shape = shape_registry.get(name)
    built = shape_registry.build(shape, options.work_dir, graphs=options.graphs, precisions=options.precisions,
                                 threads=workload.threads, progress=progress)
    fastllm_dirs = [*built.fastllm_dirs, *extra_dirs]
    context = min([shape.max_context] + [Manifest.read(d).max_context for d in fastllm_dirs])
    cases, dropped = workload.cases(context)
    if dropped:
        notes.append(f"{name}: prompt lengths {dropped} left out: prompt + {workload.new_tokens} new tokens exceed "
                     f"the context of {context}")
    if not cases:
        raise BenchError(f"{name}: no prompt length fits in its context of {context} tokens with "
                         f"{workload.new_tokens} new tokens; lower --prompt-lengths or --new-tokens")

    specs = resolve(options.engines, hf_dir=built.hf_dir, fastllm_dirs=fastllm_dirs,
                    peer_root=built.hf_dir.parent, precisions=options.precisions)
    engines, runnable = [], []
    for spec in specs:
        if spec.skipped is None:
            try:
                prepare(spec, built.hf_dir, progress, max_context=shape.max_context)
            except Exception as e:  # noqa: BLE001 -- a peer that cannot convert this model is skipped, not fatal
                spec = EngineSpec(**{**spec.to_dict(), "skipped": f"preparing failed: {type(e).__name__}: {e}"})
        if spec.skipped is not None:
            notes.append(f"{name}: {spec.label} skipped: {spec.skipped}")
            progress(f"{name}: {spec.label} skipped: {spec.skipped}")
        else:
            runnable.append(spec)
        size = size_on_disk(spec.model_path) if spec.skipped is None else None
        engines.append({**spec.to_dict(), "model_size_bytes": size})

    rows = []
    fits = {(case, spec.label): spec.max_batch is None or case.batch <= spec.max_batch
            for case in cases for spec in runnable}
    for spec in runnable:
        left = sorted({case.batch for case in cases if not fits[case, spec.label]})
        if left:
            notes.append(f"{name}: {spec.label} runs batch <= {spec.max_batch} only; batch sizes {left} left out")
    total = sum(fits.values()) * len(workload.sampling)
    for case in cases:
        ids = workload.prompt_ids(case, shape.vocab_size)  # (batch, prompt_length), shared by every engine
        for sampling in workload.samplings():  # greedy and sampled of one engine close in time, for their ratio
            for spec in (s for s in runnable if fits[case, s.label]):
                t0 = time.perf_counter()
                result = run_worker(spec, ids, new_tokens=workload.new_tokens, threads=workload.threads,
                                    runs=workload.runs, warmup=workload.warmup, sampling=sampling,
                                    seed=workload.seed, timeout_s=options.timeout_s)
                rows.append({"engine": spec.name, "label": spec.label, "prompt_length": case.prompt_length,
                             "batch": case.batch, "sampling": sampling.name, **result})
                progress(f"{_clock(started)} [{len(rows)}/{total}] {name} | {spec.label} | {case} | "
                         f"{sampling.name} | {_brief(result)} | {time.perf_counter() - t0:.1f} s")
    return {"name": name, "architecture": shape.architecture, "parameters": built.parameters,
            "max_context": context, "hf_dir": str(built.hf_dir), "prompt_lengths_dropped": dropped,
            "engines": engines, "results": rows}


def _clock(started: float) -> str:
    s = int(time.perf_counter() - started)
    return f"{s // 60:d}:{s % 60:02d}"


def _brief(result: dict) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}"
    s = result["summary"]
    return f"TTFT {s['ttft_s']['median'] * 1e3:.1f} ms, TPOT {s['tpot_p50_s']['median'] * 1e3:.2f} ms"

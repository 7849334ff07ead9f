"""`fastllm bench`: registered through the `fastllm.commands` entry point (the runtime never imports it)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from fastllm.bench.errors import BenchError
from fastllm.bench.shapes import PRECISIONS

EXAMPLE = "fastllm bench --shape smollm2-135m --shape gpt2 --prompt-lengths 32,128 --new-tokens 64 --runs 3"
SERVING_EXAMPLE = ("fastllm bench --serving --shape smollm2-135m --precisions fp32,int8,int4 --concurrency 1,2,4,8,16 "
                   "--prompt-lengths 128 --new-tokens 128 --threads 2")


def _ints(name: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise BenchError(f"{name} takes comma-separated integers, e.g. 32,128; got {text!r}") from None
    return parse


def register(subparsers) -> None:
    from fastllm.bench.engines import ENGINE_NAMES
    from fastllm.bench.serving import WORKLOADS, ServingWorkload
    from fastllm.bench.shapes import SHAPES
    from fastllm.bench.workload import SAMPLINGS, Workload

    d, sd = Workload(), ServingWorkload()
    p = subparsers.add_parser(
        "bench", help="time fastllm against eager PyTorch (and other engines when installed)",
        description="Time engines on models of real shapes (random weights): TTFT, TPOT, tokens/s, peak RSS, load "
                    "time. Writes results.json, results.md and results.png to --out. Example: " + EXAMPLE
                    + ". With --serving: many requests at once against one fastllm engine (continuous batching): "
                      "aggregate tokens/s, TTFT and TPOT p50/p95 per concurrency, and the prefix cache. Example: "
                    + SERVING_EXAMPLE)
    p.add_argument("--shape", action="append", default=[], help=f"model shape, repeatable: {', '.join(SHAPES)}")
    p.add_argument("--model-dir", action="append", default=[],
                   help="also time this fastllm model directory (repeatable); it is timed with the shape it matches")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated, from {','.join(ENGINE_NAMES)} (default: all; peers not installed are "
                        "skipped with a note)")
    p.add_argument("--graphs", default=None,
                   help="fastllm graph kinds to export and time for each shape (comma-separated; default "
                        "fused,portable, with --serving fused)")
    p.add_argument("--precisions", default="fp32",
                   help="fastllm precisions built and timed per graph kind (comma-separated): "
                        f"{', '.join(PRECISIONS)} (quantized from the fp32 export with `fastllm quantize`)")
    p.add_argument("--prompt-lengths", default=None,
                   help=f"comma-separated (default {','.join(map(str, d.prompt_lengths))}); lengths that do not fit the "
                        f"context with the new tokens are left out. With --serving: one length (default "
                        f"{sd.prompt_length})")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"per row (default {d.new_tokens}; with --serving, per request: {sd.new_tokens})")
    p.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)))
    p.add_argument("--sampling", default=",".join(d.sampling),
                   help="sampling modes timed per case, comma-separated: "
                        + "; ".join(str(s) for s in SAMPLINGS.values())
                        + ". EOS is ignored in every mode, so runs have the same length; results.md puts each "
                          "engine's sampled TPOT beside its greedy TPOT")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--runs", type=int, default=d.runs, help="timed runs per case (medians and min/max reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs before them")
    p.add_argument("--seed", type=int, default=d.seed, help="of the random prompt ids")
    p.add_argument("--work-dir", default="runs/bench", help="where built models are cached (under models/<shape>)")
    p.add_argument("--out", default=None, help="output directory (default: runs/bench/<timestamp>)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per engine x case process")
    s = p.add_argument_group("serving (--serving)")
    s.add_argument("--serving", action="store_true",
                   help="run the serving benchmark instead (fastllm models only; --batch-sizes, --sampling, --runs "
                        "and --warmup do not apply)")
    s.add_argument("--concurrency", default=",".join(map(str, sd.concurrency)),
                   help="requests in flight at once, comma-separated")
    s.add_argument("--workloads", default=",".join(sd.workloads),
                   help=f"comma-separated, from {','.join(WORKLOADS)}: waves of requests submitted at once; a "
                        "Poisson stream of arrivals at --rate with at most c in flight")
    s.add_argument("--requests", type=int, default=sd.min_requests,
                   help=f"together: at least this many requests per concurrency, in at least {sd.min_waves} waves")
    s.add_argument("--rate", type=float, default=sd.rate, help="poisson: mean arrivals per second")
    s.add_argument("--poisson-requests", type=int, default=sd.poisson_requests, help="poisson: requests per concurrency")
    s.add_argument("--prefix-length", type=int, default=sd.prefix_length,
                   help=f"prefix cache: TTFT of a prompt whose first N tokens are cached against the same prompt "
                        f"uncached ({sd.prefix_suffix} more tokens after them; 0 skips it)")
    s.add_argument("--slots", type=int, default=None, help="the engine's slots (default: the largest concurrency)")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="the engine's prefill chunk, prompt positions per step (default: the engine's)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.serving:
        return run_serving(args)
    try:
        from fastllm.bench import plot, report, runner
        from fastllm.bench.engines import ENGINE_NAMES
        from fastllm.bench.workload import Workload
    except ImportError as e:
        raise BenchError(f"`fastllm bench` needs the export and bench extras ({e.name} is missing): "
                         "pip install torch==2.13.0 'fastllm[export,bench]'") from None
    d = Workload()
    workload = Workload(prompt_lengths=_ints("--prompt-lengths")(args.prompt_lengths or
                                                                  ",".join(map(str, d.prompt_lengths))),
                        new_tokens=d.new_tokens if args.new_tokens is None else args.new_tokens,
                        batch_sizes=_ints("--batch-sizes")(args.batch_sizes),
                        sampling=tuple(s.strip() for s in args.sampling.split(",") if s.strip()),
                        threads=args.threads, runs=args.runs,
                        warmup=args.warmup, seed=args.seed)
    options = runner.BenchOptions(
        shapes=tuple(args.shape), workload=workload, engines=_names(args.engines or ",".join(ENGINE_NAMES)),
        model_dirs=tuple(args.model_dir), graphs=_names(args.graphs or "fused,portable"),
        precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()), work_dir=args.work_dir,
        timeout_s=args.timeout)
    out = _out_dir(args)
    results = runner.run(options)
    if plot.write_plot(results, out / "results.png") is None:
        results["notes"].append("results.png not written: matplotlib is not installed (pip install 'fastllm[bench]')")
    report.write_json(results, out / "results.json")
    report.write_markdown(results, out / "results.md")
    print(report.markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" +
          (f", {out / 'results.png'}" if (out / "results.png").is_file() else ""), file=sys.stderr)
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _out_dir(args) -> Path:
    out = Path(args.out or Path(args.work_dir) / datetime.now().strftime("%Y%m%d-%H%M%S"))
    taken = [name for name in ("results.json", "results.md", "results.png") if (out / name).exists()]
    if taken:  # checked before the run: an earlier run's results are never replaced
        raise BenchError(f"--out {out} already holds {', '.join(taken)} from an earlier run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_serving(args) -> int:
    try:
        from fastllm.bench import plot, report, serving_runner
        from fastllm.bench.serving import ServingWorkload
    except ImportError as e:
        raise BenchError(f"`fastllm bench --serving` needs the export and bench extras ({e.name} is missing): "
                         "pip install torch==2.13.0 'fastllm[export,bench]'") from None
    if args.engines is not None and _names(args.engines) != ("fastllm",):
        raise BenchError(f"--serving measures fastllm models only; drop --engines {args.engines} (or pass "
                         "--engines fastllm)")
    lengths = _ints("--prompt-lengths")(args.prompt_lengths) if args.prompt_lengths else ()
    if len(lengths) > 1:
        raise BenchError(f"--serving takes one prompt length, got --prompt-lengths {args.prompt_lengths}")
    d = ServingWorkload()
    workload = ServingWorkload(
        concurrency=_ints("--concurrency")(args.concurrency), prompt_length=lengths[0] if lengths else d.prompt_length,
        new_tokens=d.new_tokens if args.new_tokens is None else args.new_tokens, workloads=_names(args.workloads),
        min_requests=args.requests, rate=args.rate, poisson_requests=args.poisson_requests,
        prefix_length=args.prefix_length, threads=args.threads, slots=args.slots, prefill_chunk=args.prefill_chunk,
        seed=args.seed)
    options = serving_runner.ServingOptions(
        shapes=tuple(args.shape), workload=workload, model_dirs=tuple(args.model_dir),
        graphs=_names(args.graphs or "fused"), precisions=_names(args.precisions), work_dir=args.work_dir,
        timeout_s=args.timeout)
    out = _out_dir(args)
    results = serving_runner.run(options)
    if plot.write_serving_plot(results, out / "results.png") is None:
        results["notes"].append("results.png not written: matplotlib is not installed (pip install 'fastllm[bench]')")
    report.write_json(results, out / "results.json")
    report.write_serving_markdown(results, out / "results.md")
    print(report.serving_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" +
          (f", {out / 'results.png'}" if (out / "results.png").is_file() else ""), file=sys.stderr)
    return 0

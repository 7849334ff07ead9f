"""`fastllm bench`: registered through the `fastllm.commands` entry point (the runtime never imports it)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from fastllm.bench.errors import BenchError
from fastllm.bench.shapes import PRECISIONS

EXAMPLE = "fastllm bench --shape smollm2-135m --shape gpt2 --prompt-lengths 32,128 --new-tokens 64 --runs 3"


def _ints(name: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise BenchError(f"{name} takes comma-separated integers, e.g. 32,128; got {text!r}") from None
    return parse


def register(subparsers) -> None:
    from fastllm.bench.engines import ENGINE_NAMES
    from fastllm.bench.shapes import SHAPES
    from fastllm.bench.workload import SAMPLINGS, Workload

    d = Workload()
    p = subparsers.add_parser(
        "bench", help="time fastllm against eager PyTorch (and other engines when installed)",
        description="Time engines on models of real shapes (random weights): TTFT, TPOT, tokens/s, peak RSS, load "
                    "time. Writes results.json, results.md and results.png to --out. Example: " + EXAMPLE)
    p.add_argument("--shape", action="append", default=[], help=f"model shape, repeatable: {', '.join(SHAPES)}")
    p.add_argument("--model-dir", action="append", default=[],
                   help="also time this fastllm model directory (repeatable); it is timed with the shape it matches")
    p.add_argument("--engines", default=",".join(ENGINE_NAMES),
                   help=f"comma-separated, from {','.join(ENGINE_NAMES)} (default: all; peers not installed are "
                        "skipped with a note)")
    p.add_argument("--graphs", default="fused,portable",
                   help="fastllm graph kinds to export and time for each shape (comma-separated)")
    p.add_argument("--precisions", default="fp32",
                   help="fastllm precisions built and timed per graph kind (comma-separated): "
                        f"{', '.join(PRECISIONS)} (quantized from the fp32 export with `fastllm quantize`)")
    p.add_argument("--prompt-lengths", default=",".join(map(str, d.prompt_lengths)),
                   help="comma-separated; lengths that do not fit the context with the new tokens are left out")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
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
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from fastllm.bench import plot, report, runner
        from fastllm.bench.workload import Workload
    except ImportError as e:
        raise BenchError(f"`fastllm bench` needs the export and bench extras ({e.name} is missing): "
                         "pip install torch==2.13.0 'fastllm[export,bench]'") from None
    workload = Workload(prompt_lengths=_ints("--prompt-lengths")(args.prompt_lengths), new_tokens=args.new_tokens,
                        batch_sizes=_ints("--batch-sizes")(args.batch_sizes),
                        sampling=tuple(s.strip() for s in args.sampling.split(",") if s.strip()),
                        threads=args.threads, runs=args.runs,
                        warmup=args.warmup, seed=args.seed)
    options = runner.BenchOptions(
        shapes=tuple(args.shape), workload=workload, engines=tuple(e.strip() for e in args.engines.split(",") if e),
        model_dirs=tuple(args.model_dir), graphs=tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
        precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()), work_dir=args.work_dir,
        timeout_s=args.timeout)
    out = Path(args.out or Path(args.work_dir) / datetime.now().strftime("%Y%m%d-%H%M%S"))
    taken = [name for name in ("results.json", "results.md", "results.png") if (out / name).exists()]
    if taken:  # checked before the run: an earlier run's results are never replaced
        raise BenchError(f"--out {out} already holds {', '.join(taken)} from an earlier run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    results = runner.run(options)
    if plot.write_plot(results, out / "results.png") is None:
        results["notes"].append("results.png not written: matplotlib is not installed (pip install 'fastllm[bench]')")
    report.write_json(results, out / "results.json")
    report.write_markdown(results, out / "results.md")
    print(report.markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" +
          (f", {out / 'results.png'}" if (out / "results.png").is_file() else ""), file=sys.stderr)
    return 0

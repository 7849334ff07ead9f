"""Speculative decoding (prompt-lookup drafts) against plain decoding, on real text: tokens/s with and without,
and how many drafted tokens were kept.

    python -m fastllm.bench.speculative [--model DIR] [--prompts 6] [--new-tokens 128] [--rounds 3] [--threads 2]
                                        [--out DIR]

Two workloads from the held-out documentation passages of the project's corpus (never trained on): grounded, a
passage followed by its first words again, so the model's continuation can restate what it has read; open-ended,
the first words of a passage alone. Greedy; both engines in this process, alternating request by request, each
request timed from submit to its last token. Same tokens from both is checked, not assumed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import fastllm
from fastllm.bench.machine import machine, versions
from fastllm.export.corpus import split

PASSAGE_CHARS = 900  # of a passage in a grounded prompt
LEAD_CHARS = 60  # the first words that follow it (grounded) or make the whole prompt (open-ended)


def workloads(count: int) -> dict[str, list[str]]:
    passages = [text for text in split()[1] if len(text) >= PASSAGE_CHARS][:count]
    return {"grounded": [p[:PASSAGE_CHARS] + "\n\n" + p[:LEAD_CHARS] for p in passages],
            "open-ended": [p[:LEAD_CHARS] for p in passages]}


def run(model: Path, *, prompts: int, new_tokens: int, rounds: int, threads: int) -> dict:
    plain = fastllm.load(model, threads=threads)
    spec = fastllm.load(model, threads=threads, speculative=True)
    params = fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = {}
    try:
        for engine in (plain, spec):  # warm-up
            engine.generate("warm up", params.replace(max_new_tokens=8))
        for name, texts in workloads(prompts).items():
            rates = {"plain": [], "speculative": []}
            before = spec.stats()
            same = True
            for _ in range(rounds):
                for text in texts:
                    results = {}
                    for label, engine in (("plain", plain), ("speculative", spec)):
                        start = time.perf_counter()
                        c = engine.generate(text, params)
                        rates[label].append(c.completion_tokens / (time.perf_counter() - start))
                        results[label] = c.token_ids
                    same &= results["plain"] == results["speculative"]
            after = spec.stats()
            drafted = after["drafted_tokens"] - before["drafted_tokens"]
            kept = after["accepted_tokens"] - before["accepted_tokens"]
            steps = after["speculative_steps"] - before["speculative_steps"]
            p, s = statistics.median(rates["plain"]), statistics.median(rates["speculative"])
            out[name] = {"prompts": len(texts), "plain_tok_s": round(p, 1), "speculative_tok_s": round(s, 1),
                         "speedup": round(s / p, 3), "drafted": drafted, "kept": kept,
                         "acceptance": round(kept / drafted, 3) if drafted else None, "verify_steps": steps,
                         "same_tokens": same}
    finally:
        plain.close()
        spec.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from fastllm.cli import BUNDLED_MODEL

    ap = argparse.ArgumentParser(prog="python -m fastllm.bench.speculative", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(BUNDLED_MODEL), help="a fastllm model directory (fused "
                    "graph; default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=6, help="passages per workload")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="times each prompt is run per engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write results.json here (a new or empty directory)")
    args = ap.parse_args(argv)
    for name in ("prompts", "new_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} is not empty; give a new directory")
    try:
        results = run(args.model, prompts=args.prompts, new_tokens=args.new_tokens, rounds=args.rounds,
                      threads=args.threads)
    except fastllm.FastLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"machine": machine(), "versions": versions(), "model": str(args.model), "threads": args.threads,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "greedy": True, "workloads": results}
    for name, r in results.items():
        print(f"{name:>10}: plain {r['plain_tok_s']} tok/s, speculative {r['speculative_tok_s']} tok/s "
              f"(x{r['speedup']}), kept {r['kept']} of {r['drafted']} drafted in {r['verify_steps']} verify steps, "
              f"same tokens: {r['same_tokens']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

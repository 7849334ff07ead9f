"""The main job: export the project's own trained model (verified against PyTorch), stream text from it, and time
it side by side with eager PyTorch.

Run with `bash scripts/setup.sh && .venv/bin/python scripts/demo.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastllm
from fastllm.bench.engines import EngineSpec, fastllm_spec, size_on_disk
from fastllm.bench.workers import run_worker
from fastllm.export import export_model
from fastllm.train.bundled import BUNDLED

PROMPTS = ["The list type", "To open a file,", "A decorator is"]
THREADS = 2


def say(line: str = "") -> None:
    print(line, flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fastllm-demo-") as tmp:  # the export is the demo's own, removed after
        return demo(Path(tmp) / "pydoc-llama")


def demo(model_dir: Path) -> int:
    t0 = time.perf_counter()
    record = json.loads((BUNDLED / "training.json").read_text())
    say(f"[1/4] bundled model {BUNDLED.name}: {record['parameters'] / 1e6:.1f} M parameters, trained here in "
        f"{record['train_seconds'] / 60:.1f} min on the Python documentation (held-out perplexity "
        f"{record['val_ppl']:.1f})")
    say(f"[2/4] exporting it to {model_dir} (verified against PyTorch; the package ships the same export)")
    export_model(BUNDLED, model_dir, progress=lambda line: say(f"      {line}"))
    engine = fastllm.load(model_dir, threads=THREADS)
    v = engine.manifest.verification
    say(f"      {model_dir}: {engine.manifest.graph.kind} graph, max |Δlogits| {v['max_abs_diff']:.1e}, greedy tokens "
        f"identical to PyTorch")

    say("[3/4] generating (streamed)")
    for title, params in (("greedy", fastllm.SamplingParams(max_new_tokens=48)),
                          ("sampled, T=0.8, top-p 0.95", fastllm.SamplingParams(
                              max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0))):
        say(f"  -- {title}")
        for prompt in PROMPTS:
            sys.stdout.write(f"  > {prompt}")
            for piece in engine.stream(prompt, params):
                sys.stdout.write(piece.replace("\n", "\n    "))
                sys.stdout.flush()
            say()

    say(f"[4/4] side by side, each engine in its own process: prompt 64 tokens, 64 new tokens, batch 1, "
        f"{THREADS} threads, fp32")
    ids = np.random.default_rng(0).integers(2, engine.manifest.vocab_size, size=(1, 64))
    specs = [EngineSpec("torch-fp32", "torch", "eager PyTorch fp32", "fp32", str(BUNDLED)), fastllm_spec(model_dir)]
    rows = []
    for spec in specs:
        result = run_worker(spec, ids, new_tokens=64, threads=THREADS, runs=3, warmup=1)
        if "error" in result:
            say(f"      {spec.label}: {result['error']}")
            return 1
        s = result["summary"]
        rows.append((spec.label, s["ttft_s"]["median"] * 1e3, s["tpot_p50_s"]["median"] * 1e3,
                     s["decode_tok_s"]["median"], size_on_disk(spec.model_path) / 1e6))
    say(f"      {'engine':<24}{'TTFT ms':>9}{'TPOT ms':>9}{'tok/s':>8}{'size MB':>9}")
    for label, ttft, tpot, tps, size in rows:
        say(f"      {label:<24}{ttft:9.1f}{tpot:9.2f}{tps:8.0f}{size:9.1f}")
    ref, ours = rows[0], rows[1]
    say(f"      fastllm vs eager PyTorch: TTFT x{ours[1] / ref[1]:.2f}, TPOT x{ours[2] / ref[2]:.2f}")
    say(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

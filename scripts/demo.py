"""The main job: build a small model locally, export it (verified against PyTorch), and stream text from it.

Run with `bash scripts/setup.sh && .venv/bin/python scripts/demo.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fastllm
from export import export_model
from export.tiny import build_tiny, train_tokenizer

ROOT = Path(__file__).resolve().parents[1] / "runs" / "demo"
PROMPTS = ["The function", "Return the value of", "A class is"]


def main() -> int:
    hf_dir, model_dir = ROOT / "hf-llama", ROOT / "llama"
    t0 = time.perf_counter()
    print(f"[1/3] building a tiny random-weight Llama in {hf_dir}", flush=True)
    build_tiny("LlamaForCausalLM", hf_dir, tokenizer=train_tokenizer())
    print(f"[2/3] exporting to {model_dir}", flush=True)
    export_model(hf_dir, model_dir, overwrite=True, progress=lambda s: print(f"      {s}", flush=True))
    engine = fastllm.load(model_dir)
    print("[3/3] generating (random weights: the text is noise; the path is what this shows)", flush=True)
    for prompt in PROMPTS:
        sys.stdout.write(f"\n> {prompt}")
        for piece in engine.stream(prompt, fastllm.SamplingParams(max_new_tokens=32, temperature=0.8, seed=0)):
            sys.stdout.write(piece)
            sys.stdout.flush()
    c = engine.generate(PROMPTS, fastllm.SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    print(f"\n\nbatch of {len(PROMPTS)}: TTFT {c.ttft_s * 1e3:.1f} ms, TPOT {c.tpot_s * 1e3:.2f} ms; "
          f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp's own quantization quality, measured as fastllm's quality report measures: the same held-out tokens,
the same prompts, the same fp32 reference (the fastllm fp32 export, itself verified against PyTorch).

The numpy baselines in `export/baselines.py` round the weights only; llama.cpp's CPU kernels also round every
activation row to 8 bits before a quantized matmul (q8_0 blocks of 32 for q8_0 / q4_0 / q5_0 weights, q8_K blocks
of 256 for the K-quants), and keep the KV cache in fp16 by default. This runs llama.cpp itself, so its rows are what
its users get: GGUF files converted from the same Hugging Face weights (`gguf_export.write_gguf`) and quantized by
llama.cpp's own quantizer (its rules included: a q4_0 file keeps the tied embedding / LM head at q6_K), evaluated
through llama-cpp-python with every position's logits (its default fp16 KV cache unless --kv-cache f32).

    python -m fastllm.bench.llamacpp_quality HF_DIR FP32_DIR --out OUT [--types f32,q8_0,q4_0,q4_k_m]
        [--kv-cache f16|f32] [--threads 2]

Writes OUT/llamacpp_quality.json and .md (OUT must not hold them yet); the GGUF files go to a temporary directory.
Needs llama-cpp-python (optional, never in CI) and the export extra (safetensors, gguf).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import fastllm
from fastllm.bench.errors import BenchError
from fastllm.export.corpus import held_out_text
from fastllm.export.quality import EVAL_TOKENS, LOOP_TOKENS, ends_in_loop, probe_prompts, sequences_perplexity
from fastllm.export.quality_table import quality_cells
from fastllm.score import log_softmax, prompt_logits

TYPES = ("f32", "q8_0", "q4_0", "q4_k_m")
CACHES = {"f16": 1, "f32": 0}  # KV cache types (ggml type ids): llama.cpp's default, and the exact one
WINDOW = 256  # as the quality report's perplexity


def matrix_bits(path: Path) -> tuple[float, int]:
    """Bits per weight over the file's 2-D tensors (the matrices; the tied embedding counted once), and the file's
    size in bytes."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    matrices = [t for t in reader.tensors if len([d for d in t.shape if d > 1]) == 2]
    return 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices), path.stat().st_size


class LlamaCpp:
    """One GGUF file loaded with every position's logits kept."""

    def __init__(self, path: Path, *, context: int, cache: str, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=True,
                                   type_k=CACHES[cache], type_v=CACHES[cache], verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32: the next-token logits after each prefix of ids, from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out


def measure(hf_dir: Path, fp32_dir: Path, types: list[str], threads: int, cache: str = "f16",
            progress=print) -> dict:
    reference = fastllm.load(fp32_dir, threads=threads)
    m = reference.manifest
    if reference.tokenizer is None:
        raise BenchError(f"{fp32_dir} has no tokenizer: this comparison scores the held-out text, as the quality "
                         f"report does for a model with one")
    ids = reference.encode(held_out_text())[: EVAL_TOKENS + 1]
    window = min(WINDOW, m.max_context)
    prompts = probe_prompts(m.vocab_size, ids)
    progress(f"fastllm fp32 reference: {len(ids)} tokens, windows of {window}, {len(prompts)} prompts")
    ref_ppl = sequences_perplexity(reference, [ids], window)["ppl"]
    ref_log_p = [log_softmax(prompt_logits(reference, p)) for p in prompts]
    params = fastllm.SamplingParams(max_new_tokens=LOOP_TOKENS, ignore_eos=True)
    ref_tokens = [list(c.token_ids) for c in reference.generate(prompts, params)]
    inputs = np.asarray(ids[: (len(ids) - 1) // window * window]).reshape(-1, window)
    targets = np.asarray(ids[1 : inputs.size + 1]).reshape(-1, window)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-quality-") as scratch:
        from fastllm.bench.gguf_export import prepare_gguf

        for file_type in types:
            path = prepare_gguf(hf_dir, Path(scratch) / f"model-{file_type}.gguf", file_type,
                                max_context=m.max_context, progress=progress)
            bits, size = matrix_bits(path)
            start = time.perf_counter()
            engine = LlamaCpp(path, context=max(window, LOOP_TOKENS + 32), cache=cache, threads=threads)
            nll = []
            for x, y in zip(inputs, targets):
                log_q = log_softmax(engine.logits(x.tolist()))
                nll.append(-log_q[np.arange(window), y])
            ppl = math.exp(float(np.concatenate(nll).mean()))
            kls = [(np.exp(log_p) * (log_p - log_softmax(engine.logits(p)))).sum(-1)
                   for log_p, p in zip(ref_log_p, prompts)]
            kl = np.concatenate(kls)
            generated = [engine.greedy(p, LOOP_TOKENS) for p in prompts]
            first = []
            for ref, got in zip(ref_tokens, generated):
                same = [a == b for a, b in zip(ref[:32], got[:32])]
                first.append(same.index(False) if False in same else 32)
            row = {"type": file_type, "kv_cache": cache, "bits_per_weight": bits, "file_bytes": size,
                   "perplexity": ppl, "fp32_perplexity": ref_ppl, "relative_increase": ppl / ref_ppl - 1,
                   "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "positions": int(kl.size),
                   "greedy_identical": sum(f == 32 for f in first), "mean_agreeing_prefix": float(np.mean(first)),
                   "loops": sum(ends_in_loop(g) for g in generated),
                   "fp32_loops": sum(ends_in_loop(r) for r in ref_tokens),
                   "seconds": round(time.perf_counter() - start, 1)}
            progress(f"llama.cpp {file_type}, {cache} cache: {bits:.2f} bits/weight, perplexity {ppl:.3f} "
                     f"({row['relative_increase']:+.2%}), mean KL {row['mean_kl']:.2e}")
            rows.append(row)
            del engine
    import llama_cpp

    return {"hf_dir": str(hf_dir), "fp32_dir": str(fp32_dir), "tokens": len(ids), "window": window,
            "prompts": len(prompts), "threads": threads, "kv_cache": cache, "llama_cpp_python": llama_cpp.__version__,
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [("| llama.cpp | KV cache | bits/weight (matrices) | file MB | perplexity (Δ vs fastllm fp32) | mean KL | "
              "greedy identical / agreeing prefix (of 32) | loops in 128 tokens (fp32) |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['type']} | {r['kv_cache']} | " + quality_cells(
            r["bits_per_weight"], r["file_bytes"], r["perplexity"], r["relative_increase"], r["mean_kl"],
            r["greedy_identical"], result["prompts"], r["mean_agreeing_prefix"],
            f"{r['loops']}/{result['prompts']} ({r['fp32_loops']})"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastllm.bench.llamacpp_quality", description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", type=Path, help="the Hugging Face checkpoint (config.json, model.safetensors)")
    p.add_argument("fp32_dir", type=Path, help="its fastllm fp32 export: the reference")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--types", default=",".join(TYPES), help="llama.cpp file types, comma-separated")
    p.add_argument("--kv-cache", choices=sorted(CACHES), default="f16", help="llama.cpp's KV cache type")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if (args.out / "llamacpp_quality.json").exists():
        p.error(f"{args.out} already holds llamacpp_quality.json; choose another --out")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        p.error("needs llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp)")
    try:
        result = measure(args.hf_dir, args.fp32_dir, [t.strip() for t in args.types.split(",") if t.strip()],
                         args.threads, args.kv_cache)
    except (BenchError, fastllm.FastLLMError) as e:
        p.exit(2, f"error: {e}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "llamacpp_quality.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Weight-only quantization of an exported fp32 model directory, with its quality cost measured and gated.

The MatMul weights become block-wise int8 or int4 (`MatMulNBits`, ONNX Runtime's quantizer, round-to-nearest);
the embedding lookup stays fp32 (one row per token: no speed to gain). Quality is measured against the fp32
directory it came from (itself verified against PyTorch), through the runtime: perplexity on held-out text,
greedy-token agreement over a set of prompts, |Δlogits| and the KL divergence of next-token distributions. The
gate refuses a result whose perplexity rises more than the precision's budget, unless forced; nothing is written
then.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

import fastllm
from export.optimize import optimize
from export.pipeline import check_destination, staging
from export.trace import DATA_FILE, GRAPH_FILE
from fastllm.errors import ExportError
from fastllm.manifest import Manifest
from fastllm.perplexity import perplexity

BITS = {"int8": 8, "int4": 4}
PPL_BUDGET = {"int8": 0.01, "int4": 0.05}  # default gate: relative perplexity increase allowed
# Defaults chosen by measurement (smollm2-135m shape, 2 threads, TPOT): int4 symmetric blocks of 32 with int8
# compute 5.4 ms (asymmetric 6.6, fp32 compute 10.1); int8 blocks of 128 with int8 compute 8.4 ms (blocks of 32:
# 9.2; fp32 compute: 213).
BLOCK_SIZE = {"int8": 128, "int4": 32}


@dataclass(frozen=True)
class QuantOptions:
    precision: str  # "int8" | "int4"
    block_size: int | None = None  # None: the precision's default (BLOCK_SIZE)
    symmetric: bool = True
    accuracy_level: int = 4  # 4: int8 compute (VNNI / AMX on x86), 0: fp32 compute
    lm_head: bool = True  # quantize the LM head too
    max_ppl_increase: float | None = None  # None: the precision's default budget

    def __post_init__(self):
        if self.precision not in BITS:
            raise ExportError(f"precision must be one of {', '.join(BITS)} for quantization, got {self.precision!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", BLOCK_SIZE[self.precision])
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level must be 0-4, got {self.accuracy_level}")

    @property
    def budget(self) -> float:
        return PPL_BUDGET[self.precision] if self.max_ppl_increase is None else self.max_ppl_increase


# -- stage: quantize the graph ------------------------------------------------------------------------------------
def quantize_graph(directory: Path, options: QuantOptions) -> list[str]:
    """Rewrite directory/model.onnx in place; returns the names of the MatMuls left in fp32."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    model = onnx.load(str(directory / GRAPH_FILE), load_external_data=True)
    keep = [] if options.lm_head else [n.name for n in model.graph.node if "logits" in n.output]
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[options.precision], block_size=options.block_size,
                                     is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                                     nodes_to_exclude=keep)
    quantizer.process()
    (directory / DATA_FILE).unlink()
    quantizer.model.save_model_to_file(str(directory / GRAPH_FILE), use_external_data_format=True)
    saved = onnx.load(str(directory / GRAPH_FILE), load_external_data=False)
    # the quantizer names its external data file after the graph; keep the directory's convention
    data = {t.external_data[0].value for t in saved.graph.initializer if t.external_data}
    if data != {DATA_FILE}:
        raise ExportError(f"the quantizer wrote weights to {sorted(data)}, expected {DATA_FILE}")
    return keep + [n.name for n in saved.graph.node if n.op_type == "MatMul" and n.input[1] in
                   {t.name for t in saved.graph.initializer}]


# -- stage: measure the quality cost ------------------------------------------------------------------------------
def probe_prompts(vocab: int, ids: list[int] | None, count: int = 8, length: int = 24,
                  seed: int = 1) -> list[list[int]]:
    """Prompts for the greedy and logits comparisons: slices of the evaluation text when there is one (what the
    model is for), else random ids."""
    rng = np.random.default_rng(seed)
    if ids is not None and len(ids) > count * length:
        starts = np.linspace(0, len(ids) - length, count).astype(int)
        return [list(ids[s : s + length]) for s in starts]
    return [rng.integers(2, vocab, size=length).tolist() for _ in range(count)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def prompt_logits(engine, ids: list[int]) -> np.ndarray:
    """Logits at every position of one prompt, (S, V)."""
    s = engine.session
    cache, binding = s.new_cache(1, len(ids), 0), s.ort.io_binding()
    return s.forward(cache, binding, cache.prefill([ids], 0), logits_to_keep=len(ids))[0]


def next_token_stats(reference, candidate, prompts) -> dict:
    """|Δlogits| and KL(reference || candidate) of next-token distributions, at every prompt position."""
    diffs, kls = [], []
    for ids in prompts:
        ref, cand = prompt_logits(reference, ids), prompt_logits(candidate, ids)
        diffs.append(np.abs(cand.astype(np.float64) - ref).ravel())
        log_p, log_q = log_softmax(ref), log_softmax(cand)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    diff, kl = np.concatenate(diffs), np.concatenate(kls)
    return {"mean_abs_dlogits": float(diff.mean()), "max_abs_dlogits": float(diff.max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def greedy_agreement(reference, candidate, prompts, new_tokens: int = 32) -> dict:
    params = fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first = []
    for ref, cand in zip(reference.generate(prompts, params), candidate.generate(prompts, params)):
        same = [a == b for a, b in zip(ref.token_ids, cand.token_ids)]
        first.append(same.index(False) if False in same else new_tokens)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": sum(f == new_tokens for f in first),
            "first_divergence": first, "mean_agreeing_prefix": float(np.mean(first))}


def quality_report(fp32_dir: Path, quant_dir: Path, *, text: str, window: int = 256) -> dict:
    reference, candidate = fastllm.load(fp32_dir), fastllm.load(quant_dir)
    window = min(window, reference.manifest.max_context)
    ids = reference.encode(text) if reference.tokenizer else None
    report = {}
    if ids is not None and len(ids) > window:
        ref_ppl = perplexity(reference, ids, window=window)
        cand_ppl = perplexity(candidate, ids, window=window)
        report["perplexity"] = {"fp32": ref_ppl.ppl, "quantized": cand_ppl.ppl,
                                "relative_increase": cand_ppl.ppl / ref_ppl.ppl - 1, "tokens": cand_ppl.tokens,
                                "window": window}
    prompts = probe_prompts(reference.manifest.vocab_size, ids)
    report["logits"] = next_token_stats(reference, candidate, prompts)
    report["greedy"] = greedy_agreement(reference, candidate, prompts)
    return report


# -- the command --------------------------------------------------------------------------------------------------
def quantize_model(src, out, options: QuantOptions, *, text: str | None = None, force: bool = False,
                   overwrite: bool = False, progress=lambda line: None) -> Manifest:
    """Quantize the fp32 fastllm model directory SRC into OUT, with a quality report and a perplexity gate."""
    src, out = Path(src), Path(out)
    manifest = Manifest.read(src)
    if manifest.precision != "fp32" or manifest.quantization:
        raise ExportError(f"{src} holds a {manifest.precision} model; quantize from an fp32 export "
                          "(`fastllm export SRC OUT`)")
    check_destination(out, overwrite)
    if text is None:
        from train.corpus import held_out_text

        text = held_out_text()
    t0 = time.perf_counter()
    with staging(out, "quantization") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        progress(f"quantize: {options.precision}, blocks of {options.block_size}, "
                 f"{'symmetric' if options.symmetric else 'asymmetric'}, accuracy level {options.accuracy_level}, "
                 f"LM head {'quantized' if options.lm_head else 'fp32'}")
        kept = quantize_graph(tmp, options)
        optimized = optimize(tmp, target="cpu") if manifest.graph.kind == "fused" else manifest.graph.optimized
        quantization = {"method": "RTN (onnxruntime MatMulNBitsQuantizer)", "bits": BITS[options.precision],
                        **{k: v for k, v in asdict(options).items() if k != "precision"}, "fp32_matmuls": kept}
        quantized = dataclasses.replace(manifest, precision=options.precision, quantization=quantization,
                                        graph=dataclasses.replace(manifest.graph, optimized=optimized))
        quantized.write(tmp)
        progress("quality: perplexity, greedy agreement, |Δlogits| and KL against the fp32 model")
        report = quality_report(src, tmp, text=text)
        ppl = report.get("perplexity")
        gate = {"max_ppl_increase": options.budget, "forced": force,
                "passed": ppl is None or ppl["relative_increase"] <= options.budget}
        report["gate"] = gate
        progress(describe_report(report))
        if not gate["passed"] and not force:
            raise ExportError(
                f"quality gate: perplexity rose {ppl['relative_increase']:.2%} ({ppl['fp32']:.3f} -> "
                f"{ppl['quantized']:.3f}), more than the {options.precision} budget of {options.budget:.2%}; "
                "nothing was written. Try a smaller --block-size, --keep-lm-head or int8, raise "
                "--max-ppl-increase, or pass --force")
        quantized = dataclasses.replace(quantized, quantization={**quantization, "quality": report})
        quantized.write(tmp)
    progress(f"done in {time.perf_counter() - t0:.1f}s: {out}")
    return quantized


def describe_report(report: dict) -> str:
    parts = []
    if "perplexity" in report:
        p = report["perplexity"]
        parts.append(f"perplexity {p['fp32']:.3f} -> {p['quantized']:.3f} ({p['relative_increase']:+.2%})")
    g, lg = report["greedy"], report["logits"]
    parts.append(f"greedy {g['identical']}/{g['prompts']} prompts identical over {g['new_tokens']} tokens "
                 f"(mean agreeing prefix {g['mean_agreeing_prefix']:.1f})")
    parts.append(f"mean KL {lg['mean_kl']:.2e}, mean |Δlogits| {lg['mean_abs_dlogits']:.3f} "
                 f"(max {lg['max_abs_dlogits']:.3f})")
    return "quality: " + "; ".join(parts)

"""Stage: quantize. A verified fp32 model directory -> its quantized form, with the quality cost measured against
it and gated. It runs inside the export pipeline (`fastllm export --precision int4`, the fp32 graph an
intermediate in the staging directory) and on its own for an existing fp32 export (`fastllm quantize`).

The graph rewrite is export/quantized_graph.py, mixed precision export/mixed.py, the measurements and the gate
export/quality.py. Quality is measured through the runtime: perplexity on held-out text, greedy-token agreement
over a set of prompts, |Δlogits| and the KL divergence of next-token distributions. The gate refuses a result
worse than the precision's limits, unless forced; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from fastllm.errors import ExportError
from fastllm.export.activation_scaling import scaled_copy
from fastllm.export.calibration import activation_stats
from fastllm.export.corpus import held_out_text, split
from fastllm.export.mixed import choose
from fastllm.export.optimize import optimize
from fastllm.export.precision import PREFILL, QuantOptions
from fastllm.export.quality import describe_report, gate, quality_report, refusal
from fastllm.export.quantized_graph import quantize_graph
from fastllm.export.staging import MODEL_FILES, check_destination, staging
from fastllm.export.trace import DATA_FILE, GRAPH_FILE, PREFILL_DATA_FILE, PREFILL_FILE
from fastllm.manifest import Manifest

Progress = Callable[[str], None]
ALGORITHMS = {"weight-only": "block-wise MatMulNBits (nodes by onnxruntime's MatMulNBitsQuantizer)",
              "dynamic": "per-channel int8 weights, activations quantized per call, MatMulInteger (onnxruntime "
                         "quantize_dynamic)"}


def quiet(_: str) -> None:
    pass


def calibration_text() -> str:
    """Text for choosing mixed precision: the training corpus (never the held-out text the gate measures)."""
    return "\n\n".join(split()[0])[:400_000]


def describe_options(options: QuantOptions) -> str:
    return (f"{options.precision} {options.method}"
            + (f", blocks of {options.block_size}, {'symmetric' if options.symmetric else 'asymmetric'}, "
               f"{'fitted' if options.fit_scales else 'round-to-nearest'} scales"
               f"{', activation-aware' if options.activation_aware else ''}, "
               f"accuracy level {options.accuracy_level}" if options.method == "weight-only" else "")
            + f", LM head {'quantized' if options.lm_head else 'fp32'}"
            + f", embedding {'quantized' if options.embedding else 'fp32'}"
            + (f", prompt graph {options.prefill}" if options.prefill else ""))


def quantize(fp32: Path, tmp: Path, options: QuantOptions, *, text: str | None = None,
             calibration: str | None = None, force: bool = False, progress: Progress = quiet) -> Manifest:
    """The verified fp32 model directory FP32 -> its quantized model in the staging directory TMP (manifest with
    the quality report, tokenizer, graph). Raises the gate's refusal unless forced.

    text: held-out text for the quality report (default: the corpus's held-out split); calibration: text for
    choosing mixed precision (default: the corpus's training split)."""
    manifest = Manifest.read(fp32)
    for f in fp32.iterdir():
        if f.name in MODEL_FILES - {GRAPH_FILE, DATA_FILE} and f.is_file():  # a user's own files stay behind
            shutil.copy2(f, tmp / f.name)
    kept, mixed, activations, scaling = {}, None, None, None
    source = fp32  # what is quantized: fp32, or its activation-aware scaled copy (the same function)
    if options.method == "weight-only" and options.symmetric and options.activation_aware:
        if calibration is None:
            calibration = calibration_text()
        progress("calibration: the fp32 model's activations at each MatMul on calibration text (the corpus's "
                 "training split)")
        scratch = tmp / ".calibration"
        scratch.mkdir()
        try:
            calibrated = activation_stats(fp32, calibration, scratch)
        finally:
            shutil.rmtree(scratch)
        scaling = scaled_copy(fp32, tmp / ".scaled", calibrated, bits=options.bits, block=options.block_size,
                              progress=progress)
        source = fp32 if "skipped" in scaling else tmp / ".scaled"
        activations = calibrated.mean_square
    if options.mixed:
        scratch = tmp / ".mixed"
        scratch.mkdir()
        if calibration is None:
            progress("mixed: calibration text from the corpus's training split (the standard library's docstrings)")
            calibration = calibration_text()
        progress(f"mixed: measuring each MatMul's sensitivity to {options.precision} on calibration text")
        kept, mixed = choose(source, options, calibration, scratch, progress, activations=activations)
        shutil.rmtree(scratch)
        progress(f"mixed: keeping {len(kept)} of {mixed['candidates']} MatMuls in {options.mixed}")
    progress(f"quantize: {describe_options(options)}" + (f", {len(kept)} MatMuls in {options.mixed}" if mixed else ""))
    graph = quantize_graph(source, tmp, options, kept=kept, activations=activations)
    if source != fp32:
        shutil.rmtree(source)
    optimized = manifest.graph.optimized
    if manifest.graph.kind == "fused":
        progress("optimize: onnxruntime graph passes for cpu on the quantized graph, saved with the model")
        optimized = optimize(tmp, target="cpu")
    algorithm = ALGORITHMS[options.method] + (
        (", activation-aware scaling (AWQ-style) from calibration text" if options.activation_aware else "")
        + (", scales fitted by weighted least squares" if options.fit_scales else ", round-to-nearest scales")
        if options.method == "weight-only" else "")
    quantization = {"method": options.method, "bits": options.bits, "algorithm": algorithm,
                    "options": {k: v for k, v in asdict(options).items() if k != "precision"}, **graph}
    if mixed:
        quantization["mixed_precision"] = mixed
    if scaling:
        quantization["activation_aware"] = scaling
    prefill = None
    if options.prefill and manifest.graph.kind != "fused":
        raise ExportError(f"--prefill needs the fused graph (its slots bind one KV buffer to both graphs); {fp32} "
                          f"holds the {manifest.graph.kind} graph: export it with --graph fused")
    if options.prefill:
        progress(f"prefill: a {options.prefill} graph for prompt chunks, sharing the KV cache with the "
                 f"{options.precision} graph")
        prefill = prefill_graph(fp32, tmp, options.prefill, fused=manifest.graph.kind == "fused")
    quantized = dataclasses.replace(manifest, precision=options.precision, quantization=quantization,
                                    graph=dataclasses.replace(manifest.graph, optimized=optimized, prefill=prefill))
    quantized.write(tmp)
    if text is None:
        progress("quality: text from the corpus's held-out split (the standard library's docstrings)")
        text = held_out_text()
    progress("quality: perplexity, greedy agreement, |Δlogits| and KL against the fp32 model")
    report = quality_report(fp32, tmp, text=text, progress=progress)
    report["gate"] = gate(report, options.precision, max_ppl_increase=options.max_ppl_increase,
                          max_kl=options.max_kl, min_agreeing_prefix=options.min_agreeing_prefix, force=force)
    report["size_bytes"] = {"fp32": directory_size(fp32), "quantized": directory_size(tmp)}
    progress(describe_report(report))
    if not report["gate"]["passed"] and not force:
        chosen = ""
        if mixed:
            met = mixed["calibration_ppl_increase"][str(mixed["kept_count"])]
            chosen = (f" (the {mixed['kept_count']} MatMuls --mixed kept met it on the calibration text, "
                      f"{met:+.2%}; a lower --max-ppl-increase makes it keep more)")
        raise refusal(report, note=chosen)
    quantized = dataclasses.replace(quantized, quantization={**quantization, "quality": report})
    quantized.write(tmp)
    return quantized


def prefill_graph(fp32: Path, tmp: Path, name: str, *, fused: bool) -> dict:
    """The prompt graph: fp32's graph in PREFILL[name], written as tmp/prefill.onnx (+ data) beside the decode
    graph. Same inputs and outputs, so the runtime binds the same KV buffers to both."""
    import onnx

    precision, method = PREFILL[name]
    scratch = tmp / ".prefill"
    scratch.mkdir()
    try:
        if precision == "fp32":
            shutil.copy2(fp32 / GRAPH_FILE, scratch / GRAPH_FILE)
            shutil.copy2(fp32 / DATA_FILE, scratch / DATA_FILE)
            graph = {}
        else:
            graph = quantize_graph(fp32, scratch, QuantOptions(precision, method=method))
        optimized = optimize(scratch, target="cpu") if fused else None
        model = onnx.load(str(scratch / GRAPH_FILE))
        onnx.save(model, str(tmp / PREFILL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=PREFILL_DATA_FILE, size_threshold=1024)
        for written in (PREFILL_FILE, PREFILL_DATA_FILE):  # onnx creates its data file private; match the others
            (tmp / written).chmod((tmp / GRAPH_FILE).stat().st_mode & 0o777)
    finally:
        shutil.rmtree(scratch)
    return {"file": PREFILL_FILE, "precision": precision, "method": method, "optimized": optimized,
            "matmuls": graph.get("matmuls"), "embedding": graph.get("embedding")}


def quantize_model(src, out, options: QuantOptions, *, text: str | None = None, calibration: str | None = None,
                   force: bool = False, overwrite: bool = False, progress: Progress = quiet) -> Manifest:
    """Quantize the fp32 fastllm model directory SRC into OUT, with a quality report and gate (`fastllm quantize`)."""
    src, out = Path(src), Path(out)
    manifest = Manifest.read(src)
    if manifest.precision != "fp32" or manifest.quantization:
        raise ExportError(f"{src} holds a {manifest.precision} model; quantize from an fp32 export "
                          "(`fastllm export SRC OUT`)")
    check_destination(out, overwrite, sources=(src,))
    t0 = time.perf_counter()
    with staging(out, "quantization") as tmp:
        quantized = quantize(src, tmp, options, text=text, calibration=calibration, force=force, progress=progress)
    progress(f"done in {time.perf_counter() - t0:.1f}s: {out}")
    return quantized


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())

"""Mixed precision chosen by measured sensitivity: which MatMuls to keep above the target precision.

1. Sensitivity: each weight MatMul is quantized alone (everything else fp32) and the mean KL divergence of the
   next-token distributions from the fp32 model's is measured on calibration text. A probe graph holds only the
   one quantized weight and reads every other weight from the source directory's data file, so a probe costs a
   session load and a few forward passes, not a copy of the model.
2. Selection: MatMuls are kept (int8 or fp32) in decreasing order of sensitivity; the smallest count whose
   perplexity on the calibration text is within the budget is found by doubling then bisection (perplexity falls,
   not always strictly, as more are kept), each count measured on the assembled model.

The held-out text stays out of both steps: it is only used afterwards, by the quality report and the gate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx

import fastllm
from fastllm.export.quantized_graph import lm_head, matmul_labels, weight_matmuls, weight_only
from fastllm.export.trace import GRAPH_FILE
from fastllm.perplexity import perplexity
from fastllm.score import log_softmax, prompt_logits

CALIBRATION_WINDOWS = 4  # windows of CALIBRATION_WINDOW tokens for the KL of each probe
CALIBRATION_WINDOW = 128
SEARCH_TOKENS = 4096  # calibration tokens for the perplexity of each candidate count


def probe_directory(src: Path, scratch: Path) -> Path:
    """A directory the runtime loads probe graphs from: src's manifest and tokenizer, and a copy of src's data file
    for the weights a probe leaves unchanged (ONNX Runtime reads external data only from the graph's directory,
    and onnx refuses a hard-linked data file)."""
    directory = scratch / "probe"
    directory.mkdir()
    for f in src.iterdir():
        if f.name != GRAPH_FILE and f.is_file():
            shutil.copyfile(f, directory / f.name)
    return directory


def load_probe(directory: Path, model: onnx.ModelProto):
    """The engine for this graph (its new weights inline, the others read from the directory's data file)."""
    onnx.save_model(model, str(directory / GRAPH_FILE))
    return fastllm.load(directory)


def mean_kl(reference: list[np.ndarray], engine, windows: list[list[int]]) -> float:
    kls = []
    for log_p, ids in zip(reference, windows):
        log_q = log_softmax(prompt_logits(engine, ids))
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    return float(np.mean(kls))


def sensitivities(src: Path, light: onnx.ModelProto, candidates: list[str], options, ids: list[int],
                  directory: Path, progress, activations=None) -> dict[str, float]:
    """Mean KL (fp32 || only this MatMul quantized) on calibration windows, for each candidate."""
    w = CALIBRATION_WINDOW
    windows = [ids[i * w : (i + 1) * w] for i in range(min(CALIBRATION_WINDOWS, len(ids) // w))]
    reference_engine = fastllm.load(src)
    reference = [log_softmax(prompt_logits(reference_engine, x)) for x in windows]
    result, t0 = {}, time.perf_counter()
    for i, name in enumerate(candidates):
        probe = load_probe(directory, weight_only(light, src, {name: options.precision}, options, activations))
        result[name] = mean_kl(reference, probe, windows)
        if (i + 1) % 10 == 0 or i + 1 == len(candidates):
            progress(f"mixed: sensitivity of {i + 1}/{len(candidates)} MatMuls measured "
                     f"({time.perf_counter() - t0:.0f}s)")
    return result


def choose(src: Path, options, calibration_text: str, scratch: Path, progress, *,
           activations=None) -> tuple[dict[str, str], dict]:
    """The MatMuls to keep at options.mixed, and the measurements behind the choice (for the manifest)."""
    light = onnx.load(str(src / GRAPH_FILE), load_external_data=False)
    head = lm_head(light)
    candidates = [n.name for n in weight_matmuls(light) if options.lm_head or head is None or n.name != head.name]
    reference = fastllm.load(src)
    ids = reference.encode(calibration_text)[: SEARCH_TOKENS + 1]
    directory = probe_directory(src, scratch)
    kl = sensitivities(src, light, candidates, options, ids, directory, progress, activations)
    order = sorted(candidates, key=lambda n: -kl[n])
    window = min(256, reference.manifest.max_context)
    base = perplexity(reference, ids, window=window).ppl
    measured: dict[int, float] = {}

    def increase(k: int) -> float:
        if k not in measured:
            assignment = {n: options.precision for n in order[k:]}
            assignment.update({n: options.mixed for n in order[:k] if options.mixed != "fp32"})
            engine = load_probe(directory, weight_only(light, src, assignment, options, activations))
            measured[k] = perplexity(engine, ids, window=window).ppl / base - 1
            progress(f"mixed: {k} kept in {options.mixed} -> calibration perplexity {measured[k]:+.2%}")
        return measured[k]

    budget, low, high = options.budget, 0, 1
    if increase(0) > budget:  # double until within budget, then bisect between the last miss and the first hit
        while high < len(order) and increase(high) > budget:
            low, high = high, min(2 * high, len(order))
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if increase(mid) > budget else (low, mid)
        k = high
    else:
        k = 0
    kept = {n: options.mixed for n in order[:k]}
    labels = matmul_labels(light)
    report = {"keep": options.mixed, "budget": budget, "kept": [labels[n] for n in order[:k]], "kept_count": k,
              "candidates": len(candidates), "sensitivity": "mean KL vs fp32, this MatMul alone quantized, on "
              f"{CALIBRATION_WINDOWS} x {CALIBRATION_WINDOW} calibration tokens",
              "kl": {labels[n]: kl[n] for n in order}, "calibration_ppl_fp32": base,
              "calibration_ppl_increase": {str(c): v for c, v in sorted(measured.items())},
              "met_on_calibration": increase(k) <= budget}
    return kept, report

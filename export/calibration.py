"""What each weight MatMul of an fp32 graph sees on calibration text: per input feature, the mean of x^2.

Quantization uses it to weigh each weight's rounding error by how much of it reaches the output (export/blockwise.py):
a MatMul's output error is x . (w - q), whose mean square over activations x is sum_k E[x_k^2] (w_k - q_k)^2 when
the features are uncorrelated, so features that carry large activations (the outlier channels of a norm's output,
say) get their weights rounded more carefully.

The statistics come from the fp32 model itself run by the runtime on windows of calibration text: a probe copy of
the graph whose MatMul inputs are extra outputs (its manifest lists them, the data file is copied beside it as
export/mixed.py's probes do), prefilled window by window. The held-out text the quality gate measures on is never
used here; a model without a tokenizer is calibrated on sequences it samples itself.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import fastllm
from fastllm.export.quantized_graph import weight_matmuls
from fastllm.export.trace import GRAPH_FILE
from fastllm.manifest import Manifest, TensorInfo

WINDOWS = 8  # calibration windows of WINDOW tokens (fewer when the text is shorter)
WINDOW = 256


SEED = 1000  # of the self-generated calibration sequences (the quality report's samples start at seed 0)


def calibration_windows(engine, text: str, *, windows: int = WINDOWS, window: int = WINDOW) -> list[list[int]]:
    """Consecutive windows of the text's token ids, at most the model's context each; for a model without a
    tokenizer, sequences the model samples itself (as the quality report measures such a model, other seeds)."""
    window = min(window, engine.manifest.max_context)
    if engine.tokenizer is None:
        from fastllm.export.quality import self_generated

        return self_generated(engine, count=windows, length=window, seed=SEED)[0]
    ids = engine.encode(text)[: windows * window]
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


SAMPLE = 512  # activation rows kept per MatMul input (evenly spaced over the calibration tokens)


@dataclass
class Activations:
    """What the calibration text makes each weight MatMul see: {MatMul name: (K,) float64 mean of x_k^2 over every
    calibration token} and {MatMul name: (rows, K) float32 sample of the activation rows themselves}."""

    mean_square: dict[str, np.ndarray]
    sample: dict[str, np.ndarray]


def activation_stats(src: Path, text: str, scratch: Path, *, windows: int = WINDOWS, window: int = WINDOW,
                     sample: int = SAMPLE) -> Activations:
    """The calibration activations of each weight MatMul of the fp32 model directory src. scratch: a new or empty
    directory for the probe (left for the caller to remove)."""
    src, scratch = Path(src), Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(src)
    light = onnx.load(str(src / GRAPH_FILE), load_external_data=False)
    inputs: dict[str, list[str]] = {}  # activation tensor -> the MatMuls reading it
    for node in weight_matmuls(light):
        inputs.setdefault(node.input[0], []).append(node.name)
    declared = {o.name for o in light.graph.output}
    extra = [name for name in inputs if name not in declared]
    light.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in extra)
    for f in src.iterdir():
        if f.is_file() and f.name != GRAPH_FILE:
            shutil.copyfile(f, scratch / f.name)
    onnx.save_model(light, str(scratch / GRAPH_FILE))
    graph = dataclasses.replace(manifest.graph, outputs=manifest.graph.outputs + tuple(
        TensorInfo(name, "float32", ("batch", "seq", "features")) for name in extra))
    dataclasses.replace(manifest, graph=graph).write(scratch)
    engine = fastllm.load(scratch, threads=None)
    sums = {name: None for name in inputs}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    count = 0
    chosen = calibration_windows(engine, text, windows=windows, window=window)
    every = max(1, sum(len(ids) for ids in chosen) // sample)  # keep one activation row in `every`
    for ids in chosen:
        session = engine.session
        cache, binding = session.new_cache(1, len(ids), 0), session.ort.io_binding()
        for name in inputs:
            binding.bind_output(name, "cpu")
        logits = np.empty((1, 1, manifest.vocab_size), dtype=np.float32)
        for feeds in cache.prefill_steps([ids], 0, len(ids)):
            session.forward(cache, binding, feeds, out=logits)
        outputs = binding.get_outputs()[: len(inputs)]  # in the order bound: the activations first
        for name, value in zip(inputs, outputs):
            x = value.numpy().reshape(-1, value.shape()[-1]).astype(np.float64)  # (tokens, K)
            sums[name] = (x * x).sum(axis=0) + (0 if sums[name] is None else sums[name])
            rows[name].append(x[(every - count % every) % every :: every].astype(np.float32))
        count += len(ids)
    if not count:
        raise ValueError("the calibration text has fewer than two tokens")
    return Activations({node: sums[name] / count for name, nodes in inputs.items() for node in nodes},
                       {node: np.concatenate(rows[name])[:sample] for name, nodes in inputs.items() for node in nodes})

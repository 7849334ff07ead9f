"""Stage: ONNX Runtime's graph optimizations, run once at export and saved, so a load does not redo them.

The saved graph holds ORT's own fusions (e.g. SimplifiedLayerNormalization for the first norm, MatMul + Add ->
Gemm/FusedMatMul) and constant folding for the target's execution provider; the manifest records the target and
the level, and the runtime then loads it with only the basic (provider-independent) passes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from fastllm.export.trace import DATA_FILE, GRAPH_FILE

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def optimize(directory: Path, *, target: str = "cpu", level: str = "extended") -> dict:
    """Rewrite directory/model.onnx (+ data) in place with ORT's optimizations for `target`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        optimized = Path(scratch) / GRAPH_FILE
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(directory / GRAPH_FILE), options, providers=PROVIDERS[target])
        os.replace(optimized, directory / GRAPH_FILE)
        os.replace(Path(scratch) / DATA_FILE, directory / DATA_FILE)
    return {"target": target, "level": level, "onnxruntime": ort.__version__}

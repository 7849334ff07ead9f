"""Stage: fp16 for CUDA. Weights, activations and the KV cache in float16 (ONNX Runtime's converter), with logits
kept float32 for sampling on the host."""

from __future__ import annotations

from pathlib import Path

import onnx

from fastllm.export.trace import DATA_FILE, GRAPH_FILE


def to_fp16(directory: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(directory / GRAPH_FILE), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=["logits"])
    (directory / DATA_FILE).unlink()
    onnx.save_model(model, str(directory / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)

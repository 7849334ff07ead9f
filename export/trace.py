"""Stage: trace DecoderLM to ONNX (portable graph) and save it with its weights as external data."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from export.decoder import DecoderLM
from fastllm.manifest import TensorInfo

OPSET = 17
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

_ONNX_DTYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "kept"},
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    return axes


def example_inputs(module: DecoderLM, batch: int = 2, seq: int = 3, past: int = 2) -> tuple:
    spec = module.spec
    kv = torch.zeros(batch, spec.num_kv_heads, past, spec.head_dim)  # (batch, kv_heads, past, head_dim)
    return (
        torch.ones(batch, seq, dtype=torch.int64),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous(),
        torch.tensor(seq, dtype=torch.int64),
        *([kv] * (2 * spec.num_layers)),
    )


def trace(module: DecoderLM, directory: Path) -> onnx.ModelProto:
    """Write directory/model.onnx (+ model.onnx.data); returns the graph without weights loaded."""
    module.eval()
    inputs, outputs = io_names(module.spec.num_layers)
    with tempfile.TemporaryDirectory(dir=directory) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        traced = Path(scratch) / "traced.onnx"
        torch.onnx.export(
            module, example_inputs(module), str(traced), dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes(module.spec.num_layers),
            do_constant_folding=True,
        )
        model = onnx.load(str(traced), load_external_data=True)
    onnx.save_model(model, str(directory / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return onnx.load(str(directory / GRAPH_FILE), load_external_data=False)


def tensor_infos(values) -> tuple[TensorInfo, ...]:
    infos = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        infos.append(TensorInfo(name=v.name, dtype=_ONNX_DTYPES[t.elem_type], shape=shape))
    return tuple(infos)

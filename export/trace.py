"""Stage: trace DecoderLM to ONNX (fused or portable graph) and save it with its weights as external data."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from fastllm.export.decoder import DecoderGraph, DecoderLM, DecoderSpec
from fastllm.export.fused import FusedDecoder
from fastllm.export.tied_embeddings import share_tied_embedding
from fastllm.manifest import TensorInfo

OPSET = 17
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PREFILL_FILE, PREFILL_DATA_FILE = "prefill.onnx", "prefill.onnx.data"  # the optional prompt graph (--prefill)

_ONNX_DTYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def io_names(kind: str, num_layers: int) -> tuple[list[str], list[str]]:
    if kind == "fused":
        inputs = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_to_keep"]
    else:
        inputs = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def dynamic_axes(kind: str, num_layers: int) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "kept"}}
    if kind == "fused":
        axes["seqlens_k"] = {0: "batch"}
        past = present = {0: "batch", 2: "capacity"}
    else:
        axes["attention_mask"] = {0: "batch", 1: "total"}
        past, present = {0: "batch", 2: "past"}, {0: "batch", 2: "total"}
    for i in range(num_layers):
        for kind_ in ("key", "value"):
            axes[f"past_key_values.{i}.{kind_}"] = past
            axes[f"present.{i}.{kind_}"] = present
    return axes


def example_inputs(kind: str, spec: DecoderSpec, batch: int = 2, seq: int = 3, past: int = 2) -> tuple:
    """Portable: a decode-like step after `past` tokens. Fused: a right-padded prompt into an 8-slot buffer."""
    length = 8 if kind == "fused" else past
    kv = torch.zeros(batch, spec.num_kv_heads, length, spec.head_dim)  # (batch, kv_heads, past|capacity, head_dim)
    caches = [kv] * (2 * spec.num_layers)
    ids = torch.ones(batch, seq, dtype=torch.int64)
    keep = torch.tensor(seq, dtype=torch.int64)
    if kind == "fused":
        positions = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
        seqlens = torch.tensor([seq - 1] + [seq - 2] * (batch - 1), dtype=torch.int32)
        return (ids, positions, seqlens, torch.tensor(seq, dtype=torch.int32), keep, *caches)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    return (ids, torch.ones(batch, past + seq, dtype=torch.int64), positions, keep, *caches)


def trace(module: DecoderLM, directory: Path, kind: str) -> None:
    """Write directory/model.onnx (+ model.onnx.data) for graph `kind`."""
    module.eval()
    spec = module.spec
    graph = DecoderGraph(FusedDecoder(module) if kind == "fused" else module, module.lm_head)
    inputs, outputs = io_names(kind, spec.num_layers)
    with tempfile.TemporaryDirectory(dir=directory) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        traced = Path(scratch) / "traced.onnx"
        torch.onnx.export(
            graph, example_inputs(kind, spec), str(traced), dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes(kind, spec.num_layers),
            do_constant_folding=True, custom_opsets={"com.microsoft": 1} if kind == "fused" else None,
        )
        model = onnx.load(str(traced), load_external_data=True)
    if spec.tie_embeddings:
        share_tied_embedding(model)
    onnx.save_model(model, str(directory / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def tensor_infos(values) -> tuple[TensorInfo, ...]:
    infos = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        infos.append(TensorInfo(name=v.name, dtype=_ONNX_DTYPES[t.elem_type], shape=shape))
    return tuple(infos)

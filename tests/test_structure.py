"""The structure of the exporter and of what it writes: readable, unique node names for every weight MatMul in both
graph kinds, kept through quantization; precisions defined once."""

from __future__ import annotations

import re

import onnx
from fastllm.export.precision import PRECISIONS, QuantOptions
from fastllm.export.quantize import matmul_labels, quantize_graph

WEIGHT_MATMUL = re.compile(r"^/model/layers\.\d+/(attn|mlp)/\w+/MatMul$|^/lm_head/MatMul$")
LABEL = re.compile(r"^(layers\.\d+\.(attn|mlp)\.\w+|lm_head) \d+x\d+$")


def weight_matmul_names(directory) -> list[str]:
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_every_weight_matmul_is_named_after_its_module(exported, variant):
    manifest, path = exported[variant]
    names = weight_matmul_names(path)
    per_layer = {"fused": 4, "portable": 6 if manifest.architecture == "GPT2LMHeadModel" else 7}[variant[1]]
    assert len(names) == per_layer * manifest.num_layers + 1
    assert [n for n in names if not WEIGHT_MATMUL.match(n)] == []
    assert len(set(names)) == len(names) and "/lm_head/MatMul" in names
    labels = matmul_labels(onnx.load(str(path / "model.onnx"), load_external_data=False))
    assert [label for label in labels.values() if not LABEL.match(label)] == []
    if variant[1] == "fused":
        assert {"layers.0.attn.qkv_proj", "layers.0.attn.o_proj", "layers.0.mlp.down_proj"} <= {
            label.split()[0] for label in labels.values()}


def test_quantized_matmuls_keep_their_names(exported, variant, tmp_path):
    _, path = exported[variant]
    names = weight_matmul_names(path)
    quantize_graph(path, tmp_path, QuantOptions("int4"))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert sorted(n.name for n in graph.node if n.op_type == "MatMulNBits") == sorted(f"{n}_Q4" for n in names)


def test_the_runtime_knows_every_precision_the_exporter_writes():
    from fastllm.manifest import PRECISIONS as KNOWN

    assert tuple(PRECISIONS) == KNOWN

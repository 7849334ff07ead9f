"""Graph rewrite: a block-quantized embedding lookup (`GatherBlockQuantized`), sharing the LM head's bytes when tied.

After weight-only quantization the embedding is the largest fp32 tensor left: for smollm2-135m it is 113 MB of a
198 MB int4 model. A lookup reads one row per token, so quantizing it buys size and load time, not speed.

`MatMulNBits` stores its weight as (N, blocks, blob): for the LM head N is the vocabulary and each row holds one
token's embedding, block-quantized along the hidden size, exactly the layout `GatherBlockQuantized` reads from
uint8 data (gather axis 0, quantize axis last, MatMulNBits' default zero points 8 / 128). With tied embeddings the
lookup therefore reads the LM head's quantized weight itself and the fp32 matrix is dropped; only the scales are
stored a second time, in the (N, blocks, 1) shape the lookup wants (3.5 MB for smollm2 int4). Without tied
embeddings (or with the LM head kept in fp32) the embedding is quantized on its own with the same routine as the
MatMul weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fastllm.export.precision import fit_block


@dataclass
class Embedding:
    """The embedding lookup of a traced graph: a Gather on `input_ids`, either plain (E (vocab, hidden), axis 0) or
    the tied form (E^T (hidden, vocab) shared with the LM head, Gather axis 1, then a Transpose)."""

    nodes: list  # the Gather (and its Transpose) to replace
    weight: str  # the initializer they read
    output: str  # the (batch, seq, hidden) activation
    transposed: bool  # weight is (hidden, vocab)


def find_embedding(graph: onnx.GraphProto) -> Embedding | None:
    inits = {t.name for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[1] == "input_ids"), None)
    if gather is None:
        return None
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis == 0:
        return Embedding([gather], gather.input[0], gather.output[0], transposed=False)
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == gather.output[0]), None)
    if axis != 1 or transpose is None:
        return None
    return Embedding([gather, transpose], gather.input[0], transpose.output[0], transposed=True)


def block_quantize(weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(K, N) fp32 -> MatMulNBits' packed (N, blocks, blob) uint8, scales (N, blocks), zero points or None."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_kn, dtype=np.float32))
    n = weight_kn.shape[1]
    return packed, scales.reshape(n, -1), (None if symmetric else zero_points)


def unpack_nibbles(packed: np.ndarray, blocks: int) -> np.ndarray:
    """MatMulNBits' int4 zero points, two per byte (low nibble first), (N, ceil(blocks / 2)) -> (N, blocks)."""
    return np.stack([packed & 0x0F, packed >> 4], -1).reshape(len(packed), -1)[:, :blocks]


def quantize_embedding(model: onnx.ModelProto, *, bits: int, block_size: int, symmetric: bool,
                       shared_head: onnx.NodeProto | None = None) -> dict:
    """Replace the embedding lookup of `model` (weights loaded) in place; returns what was done, for the manifest.

    shared_head: the LM head's MatMulNBits node when it reads the same (tied) matrix; its weight is reused.
    """
    graph = model.graph
    found = find_embedding(graph)
    if found is None:
        return {"quantized": False, "reason": "no embedding lookup on input_ids found"}
    inits = {t.name: t for t in graph.initializer}
    name = found.weight.replace(":", "_") + "_lookup"
    if shared_head is not None:
        attrs = {a.name: a.i for a in shared_head.attribute}
        bits, block_size = attrs["bits"], attrs["block_size"]
        n, k = attrs["N"], attrs["K"]
        data_name = shared_head.input[1]
        blocks = -(-k // block_size)
        scales = numpy_helper.to_array(inits[shared_head.input[2]]).reshape(n, blocks)
        zero_points = None
        if len(shared_head.input) > 3 and shared_head.input[3]:
            zp = numpy_helper.to_array(inits[shared_head.input[3]]).reshape(n, -1)
            zero_points = zp if bits == 8 else unpack_nibbles(zp, blocks)
        new_inits = []
    else:
        weight = numpy_helper.to_array(inits[found.weight])
        weight_kn = weight if found.transposed else weight.T
        k, n = weight_kn.shape
        block_size = fit_block(block_size, k)
        blocks = -(-k // block_size)
        packed, scales, zero_points = block_quantize(weight_kn, bits, block_size, symmetric)
        if zero_points is not None and bits == 4:
            zero_points = unpack_nibbles(zero_points.reshape(n, -1), blocks)
        data_name = name + f"_q{bits}"
        new_inits = [numpy_helper.from_array(packed, data_name)]
    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scales.reshape(n, blocks, 1)), name + "_scales"))
    inputs = [data_name, "input_ids", name + "_scales"]
    if zero_points is not None:
        new_inits.append(numpy_helper.from_array(
            np.ascontiguousarray(zero_points.reshape(n, blocks, 1).astype(np.uint8)), name + "_zero_points"))
        inputs.append(name + "_zero_points")
    graph.initializer.extend(new_inits)
    # (batch, seq, blocks, block_size) -> (batch, seq, hidden); the last block is zero-padded when
    # block_size does not divide the hidden size, and the padding is sliced off
    blocked, padded = found.output + "/blocks", blocks * block_size != k
    shape = name + "_hidden_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape))
    nodes = [helper.make_node("GatherBlockQuantized", inputs, [blocked], name=name, domain="com.microsoft",
                              gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
             helper.make_node("Reshape", [blocked, shape], [found.output + "/padded" if padded else found.output],
                              name=name + "/Reshape")]
    if padded:
        for suffix, value in (("_start", 0), ("_end", k), ("_axis", -1)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name + suffix))
        nodes.append(helper.make_node("Slice", [found.output + "/padded", name + "_start", name + "_end",
                                                name + "_axis"], [found.output], name=name + "/Slice"))
    index = min(list(graph.node).index(x) for x in found.nodes)
    for node in found.nodes:
        graph.node.remove(node)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    if not any(found.weight in x.input for x in graph.node):
        graph.initializer.remove(inits[found.weight])
    if not any(d.domain == "com.microsoft" for d in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"quantized": True, "bits": bits, "block_size": block_size, "symmetric": zero_points is None,
            "shared_with_lm_head": shared_head is not None}

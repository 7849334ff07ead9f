"""Graph rewrite: an fp32 graph's weight MatMuls quantized (export/quantize.py runs it as a stage).

Methods (all through ONNX Runtime's quantization tools, round-to-nearest):
- weight-only (int8 and int4): MatMul weights become block-wise `MatMulNBits`; activations stay fp32 and the
  kernel computes in int8 on VNNI/AMX (accuracy_level 4). Nodes keep their names with a suffix:
  /model/layers.3/attn/qkv_proj/MatMul -> /model/layers.3/attn/qkv_proj/MatMul_Q4.
- dynamic (int8): `MatMulInteger` with per-output-channel int8 weights, activations quantized per call
  (`DynamicQuantizeMatMul` after ORT's fusion).
- embedding: the lookup becomes a block-quantized `GatherBlockQuantized`, sharing the LM head's bytes when the
  two are tied (export/quantized_embedding.py).
- per node: any MatMul may be kept in another precision (mixed precision, export/mixed.py, or an fp32 LM head).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from fastllm.errors import ExportError
from fastllm.export import blockwise
from fastllm.export.precision import PRECISIONS, QuantOptions, fit_block
from fastllm.export.quantized_embedding import quantize_embedding
from fastllm.export.trace import DATA_FILE, GRAPH_FILE


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls with a constant weight, in graph order: what quantization rewrites."""
    inits = {t.name for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if any(not n.name for n in nodes) or len({n.name for n in nodes}) != len(nodes):
        raise ExportError("the graph's MatMul nodes need unique names to be quantized one by one")
    return nodes


def matmul_labels(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> the module it belongs to and its weight's shape, for reports: /model/layers.3/attn/qkv_proj/MatMul
    -> "layers.3.attn.qkv_proj 576x960", /lm_head/MatMul -> "lm_head 576x49152"."""
    inits = {t.name: t for t in model.graph.initializer}
    labels = {}
    for node in weight_matmuls(model):
        module = node.name.removeprefix("/model/").strip("/").removesuffix("/MatMul").replace("/", ".")
        labels[node.name] = f"{module} {'x'.join(str(d) for d in inits[node.input[1]].dims)}"
    return labels


def lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if "logits" in n.output and n.op_type in ("MatMul", "MatMulNBits")),
                None)


def load_weights(model: onnx.ModelProto, base: Path, names) -> None:
    """Bring the named external initializers of a model loaded without its data into memory."""
    names = set(names)
    for tensor in model.graph.initializer:
        if tensor.name in names and tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def weight_only(light: onnx.ModelProto, base: Path, assignment: dict[str, str], options: QuantOptions,
                activations: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of `light` (graph loaded without its data, next to `base`) with each MatMul named in `assignment`
    quantized to its precision ("int4", "int8"); the new weights are held in memory, the untouched ones still refer
    to base's data. options' block size applies to its own precision, the others get their default; either is
    fitted to each matrix's rows (fit_block).

    ONNX Runtime's MatMulNBitsQuantizer builds the nodes; with options.fit_scales (symmetric only) their weights
    are then written again by export/blockwise.py with each block's scale fitted, weighing each input feature's
    error by `activations` ({MatMul name: (K,) mean x^2}, export/calibration.py) where given."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    model = onnx.ModelProto()
    model.CopyFrom(light)
    nodes = {n.name: n for n in weight_matmuls(model)}
    weights = {n.input[1] for n in nodes.values()}
    rows = {t.name: t.dims[0] for t in model.graph.initializer if t.name in weights}  # MatMul weights are (K, N)
    groups: dict[tuple[str, int], list[str]] = {}
    for name, precision in assignment.items():
        block = options.block_size if precision == options.precision else PRECISIONS[precision].block_size
        groups.setdefault((precision, fit_block(block, rows[nodes[name].input[1]])), []).append(name)
    fit = options.fit_scales and options.symmetric
    for (precision, block), group in sorted(groups.items()):
        load_weights(model, base, [nodes[name].input[1] for name in group])
        originals = {}
        if fit:
            inits = {t.name: t for t in model.graph.initializer}
            originals = {name: numpy_helper.to_array(inits[nodes[name].input[1]]) for name in group}
        bits = PRECISIONS[precision].bits
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=options.symmetric,
                                         accuracy_level=options.accuracy_level,
                                         nodes_to_exclude=[n for n in nodes if n not in group])
        quantizer.process()
        model = quantizer.model.model
        if fit:
            refit(model, originals, bits, block, activations or {})
    return model


def refit(model: onnx.ModelProto, originals: dict[str, np.ndarray], bits: int, block: int,
          activations: dict[str, np.ndarray]) -> None:
    """Write the weights and scales of the MatMulNBits nodes made from the MatMuls `originals` ({name: fp32 (K, N)})
    again with fitted scales (export/blockwise.py), in place: same initializers, same shapes."""
    made = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    inits = {t.name: t for t in model.graph.initializer}
    for name, weight in originals.items():
        node = made.get(f"{name}_Q{bits}")
        if node is None:
            raise ExportError(f"MatMulNBitsQuantizer made no node {name}_Q{bits} from {name}")
        packed, scales = blockwise.quantize(weight, bits, block, activations=activations.get(name))
        for index, array in ((1, packed), (2, scales)):
            tensor = inits[node.input[index]]
            if math.prod(tensor.dims) != array.size:
                raise ExportError(f"{node.name}: {tensor.name} has shape {tuple(tensor.dims)}, the fit made "
                                  f"{array.shape}")
            tensor.CopyFrom(numpy_helper.from_array(array.reshape(tuple(tensor.dims)), tensor.name))


def dynamic_int8(model: onnx.ModelProto, scratch: Path, exclude: list[str]) -> onnx.ModelProto:
    """MatMul weights per-output-channel int8, activations quantized on the fly (MatMulInteger)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    path = scratch / "dynamic.onnx"
    # DefaultTensorType: our graphs carry contrib ops whose outputs the quantizer cannot type; they are all fp32
    quantize_dynamic(model, path, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_exclude=exclude, use_external_data_format=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(str(path), load_external_data=True)


def quantize_graph(src: Path, out: Path, options: QuantOptions, *, kept: dict[str, str] | None = None,
                   activations: dict[str, np.ndarray] | None = None) -> dict:
    """Write src's graph quantized into out/model.onnx (+ data); returns what was done, for the manifest.

    kept: MatMul name -> "int8" | "fp32" for the nodes mixed precision keeps higher; activations: per MatMul the
    calibration activations' mean x^2 per input feature, weighing the fitted scales' error (weight_only).
    """
    light = onnx.load(str(src / GRAPH_FILE), load_external_data=False)
    nodes = weight_matmuls(light)
    head = lm_head(light)
    tied = head is not None and any(n.op_type == "Gather" and n.input[0] == head.input[1] for n in light.graph.node)
    precision = {n.name: options.precision for n in nodes}
    if head is not None and not options.lm_head:
        precision[head.name] = "fp32"
    precision.update(kept or {})
    with_data = [n.name for n in nodes if precision[n.name] == "fp32"]
    out.mkdir(parents=True, exist_ok=True)
    if options.method == "dynamic":
        load_weights(light, src, [t.name for t in light.graph.initializer])
        model = dynamic_int8(light, out, exclude=with_data)
    else:
        model = weight_only(light, src, {name: p for name, p in precision.items() if p != "fp32"}, options,
                            activations)
        load_weights(model, src, [t.name for t in model.graph.initializer])
    embedding = {"quantized": False, "reason": "--keep-embedding"}
    head_node = lm_head(model)  # None after dynamic quantization (the head ends in a scaling Mul)
    head_kind = head_node.op_type if head_node is not None else None
    if options.embedding and tied and head_kind == "MatMul":
        # the fp32 LM head keeps the fp32 matrix anyway: the lookup reads it, a quantized copy would only add bytes
        embedding = {"quantized": False, "reason": "tied to the fp32 LM head"}
    elif options.embedding:
        shared = head_node if tied and head_kind == "MatMulNBits" else None
        embedding = quantize_embedding(model, bits=options.bits, block_size=options.block_size,
                                       symmetric=options.symmetric, shared_head=shared)
    for stale in (out / GRAPH_FILE, out / DATA_FILE):  # onnx appends to an existing data file
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(out / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    for scratch in out.glob("dynamic.onnx*"):
        scratch.unlink()
    counts = {p: sum(v == p for v in precision.values()) for p in ("int8", "int4", "fp32")}
    blocks: dict[str, int] = {}  # "int4 blocks of 32" -> count: fitted to each matrix's rows (fit_block)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            key = f"int{a['bits']} blocks of {a['block_size']}"
            blocks[key] = blocks.get(key, 0) + 1
    return {"matmuls": {p: c for p, c in counts.items() if c}, "blocks": blocks, "fp32_matmuls": with_data,
            "embedding": embedding,
            "lm_head": precision.get(head.name) if head is not None else None}

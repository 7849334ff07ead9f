"""Activation-aware scaling (AWQ-style): an fp32 graph with the same function whose weights quantize better.

A MatMul y = x W is unchanged when its input features are divided by s (k) and its weight rows multiplied by
them: y = (x / s) (diag(s) W). Block quantization along K then spends more of each block's levels on the rows
with large s. Choosing s from the activations (s = rms(x)^alpha) protects the weights that meet large
activations, at the expense of those that meet small ones, which is where the output error goes down (Lin et al.,
AWQ, 2023). alpha is searched per MatMul on a sample of calibration activations: the one whose round-to-nearest
quantization of diag(s) W gives the least output error |x W - (x / s) Q(diag(s) W)|^2 (alpha 0 is the identity,
so the search never does worse on the calibration rows than plain quantization).

The division by s is folded into what produces x, so the graph keeps its nodes and kernels:
- a norm's output (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, LayerNormalization,
  SkipLayerNormalization: gamma, and beta where there is one, divided by s; or the portable graph's written-out
  RMSNorm, a Mul by gamma) read by weight MatMuls only: the fused qkv and gate_up projections (or q / k / v and
  gate / up when unfused);
- the MLP's product act(gate) * up read by down_proj: the up columns of the gate_up (or up) weight divided by s
  (a column scale commutes with block quantization along K, so those weights lose nothing).
Anything else (o_proj after attention, a LM head whose matrix is the tied embedding) is left as it is.

The result is checked: the transformed fp32 graph's logits on a calibration window equal the original's within
the fp32 tolerance, before anything is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fastllm.export.blockwise import dequantize, quantize

ALPHAS = tuple(np.round(np.arange(0.0, 1.01, 0.1), 2))
_NORMS = {"SimplifiedLayerNormalization": (1, None), "LayerNormalization": (1, 2),
          "SkipSimplifiedLayerNormalization": (2, None), "SkipLayerNormalization": (2, 3)}  # (gamma, beta) inputs


@dataclass
class Site:
    """One activation tensor that can be rescaled: the weight MatMuls reading it, and where its division by s goes:
    the (K,) initializers of a norm (gamma / beta, as (node name, input index): a vector other nodes read too is
    copied for this one) or a column range of a weight matrix (`columns`)."""

    activation: str
    matmuls: list[str]  # node names
    vectors: list[tuple[str, int]]  # (norm node, input index) of each (K,) initializer divided by s
    columns: tuple[str, int] | None = None  # (weight initializer (K', N), first column): columns first..first+K


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def sites(model: onnx.ModelProto, matmuls: list[onnx.NodeProto]) -> list[Site]:
    """Where the graph allows the rescaling (see the module docstring), given its weight MatMuls."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    by_name = {n.name: n for n in matmuls}
    weight_of = {n.output[0]: n for n in matmuls}
    found = []
    for activation in dict.fromkeys(n.input[0] for n in matmuls):
        readers = consumers.get(activation, [])
        if activation in outputs or any(r.name not in by_name or r.input[0] != activation for r in readers):
            continue  # something else reads it too: it must keep its values
        names = [r.name for r in readers]
        if any(len(consumers.get(by_name[n].input[1], [])) != 1 for n in names):
            continue  # a weight read elsewhere too (the LM head's tied embedding) must keep its values
        node = producer.get(activation)
        if node is None:
            continue
        if node.op_type in _NORMS and node.output[0] == activation:
            gamma, beta = _NORMS[node.op_type]
            vectors = [(node.name, i) for i in (gamma, beta) if i is not None and len(node.input) > i and node.input[i]]
            if node.name and all(node.input[i] in inits for _, i in vectors):
                found.append(Site(activation, names, vectors))
        elif node.op_type == "Mul" and node.name and any(i in inits and len(inits[i].dims) == 1 for i in node.input):
            # a norm written out (the portable graph's RMSNorm): normalised x times gamma
            found.append(Site(activation, names, [(node.name, next(j for j, i in enumerate(node.input)
                                                                   if i in inits and len(inits[i].dims) == 1))]))
        elif node.op_type == "Mul":
            up = _up_columns(node, producer, consumers, weight_of, inits)
            if up is not None:
                found.append(Site(activation, names, [], up))
    return found


def _up_columns(mul: onnx.NodeProto, producer, consumers, weight_of, inits) -> tuple[str, int] | None:
    """For act(gate) * up: (the weight whose columns give `up`, its first column), when up is a weight MatMul's
    output or one piece of a constant Split of it, read by this Mul alone."""
    for operand in mul.input:
        if len(consumers.get(operand, [])) != 1:
            continue
        source = producer.get(operand)
        if source is not None and source.output[0] in weight_of:
            return weight_of[source.output[0]].input[1], 0
        if source is None or source.op_type != "Split" or source.input[0] not in weight_of:
            continue
        axis = next((a.i for a in source.attribute if a.name == "axis"), 0)
        weight = inits[weight_of[source.input[0]].input[1]]
        if axis not in (-1, 1) or len(source.input) < 2 or source.input[1] not in inits:
            continue
        sizes = numpy_helper.to_array(inits[source.input[1]]).tolist()
        index = list(source.output).index(operand)
        if sum(sizes) == weight.dims[1]:
            return weight.name, int(sum(sizes[:index]))
    return None


def output_error(x: np.ndarray, w: np.ndarray, s: np.ndarray, bits: int, block: int) -> float:
    """|x W - (x / s) Q(diag(s) W)|^2 for activation rows x (n, K), weight (K, N), Q round-to-nearest."""
    scaled = w * s[:, None]
    packed, scales = quantize(scaled, bits, block, fit=False)
    q = dequantize(packed, scales, bits, w.shape[0])
    return float((((x / s) @ q - x @ w) ** 2).sum())


def choose_scales(x: np.ndarray, mean_square: np.ndarray, w: np.ndarray, bits: int, block: int
                  ) -> tuple[np.ndarray, float, dict[float, float]]:
    """s (K,) = rms^alpha (normalised to a geometric mean of 1) for the alpha of least output error on x; returns
    s, that alpha and every alpha's error relative to alpha 0."""
    rms = np.sqrt(np.maximum(mean_square, 1e-12)).astype(np.float64)
    errors, best = {}, None
    for alpha in ALPHAS:
        s = rms ** alpha
        s = (s / np.exp(np.log(s).mean())).astype(np.float32)
        errors[float(alpha)] = output_error(x, w, s, bits, block)
        if best is None or errors[float(alpha)] < errors[best[1]]:
            best = (s, float(alpha))
    base = errors[0.0] or 1.0
    return best[0], best[1], {a: e / base for a, e in errors.items()}


def apply(model: onnx.ModelProto, site: Site, s: np.ndarray) -> None:
    """Divide the site's activation by s (in its producer) and multiply its MatMuls' weight rows by s, in place
    (the model's initializers in memory)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    consumers = _consumers(model)

    def update(name: str, fn) -> None:
        tensor = inits[name]
        tensor.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(tensor)).astype(np.float32), name))

    for name in site.matmuls:
        update(nodes[name].input[1], lambda w: w * s[:, None])
    for node_name, index in site.vectors:
        node, name = nodes[node_name], nodes[node_name].input[index]
        if sum(list(c.input).count(name) for c in consumers[name]) > 1:  # shared (deduplicated equal vectors): copy
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]), f"{name}/scaled/{node_name}")
            model.graph.initializer.append(copy)
            inits[copy.name] = model.graph.initializer[-1]
            node.input[index] = name = copy.name
        update(name, lambda v: v / s)
    if site.columns is not None:
        weight, first = site.columns

        def divide_columns(w):
            w = w.copy()
            w[:, first : first + s.size] /= s[None, :]
            return w
        update(weight, divide_columns)


def scaled_copy(src, out, activations, *, bits: int, block: int, progress=lambda _: None) -> dict:
    """Write the fp32 model directory src, activation-aware scaled, into the new directory out (its manifest,
    tokenizer and other files copied), and check its logits against src's. `activations`
    (export/calibration.Activations) is updated in place to what the scaled graph's MatMuls see. Returns what was
    done, for the manifest: {"sites", "scaled", "alphas": {MatMul label: alpha}, "max_abs_dlogits"}; or, writing
    nothing, {"skipped": why} when src's own logits are not finite (there is no function to keep)."""
    import shutil
    from pathlib import Path

    import fastllm
    from fastllm.errors import ExportError
    from fastllm.export.precision import PRECISIONS, fit_block
    from fastllm.export.quantized_graph import matmul_labels, weight_matmuls
    from fastllm.export.trace import DATA_FILE, GRAPH_FILE
    from fastllm.score import prompt_logits

    src, out = Path(src), Path(out)
    reference = fastllm.load(src)
    vocab, length = reference.manifest.vocab_size, min(64, reference.manifest.max_context)
    ids = [(7 * i + 3) % vocab for i in range(length)]  # any ids: the two graphs must agree everywhere
    a = prompt_logits(reference, ids)
    if not np.isfinite(a).all():  # nothing to keep equal; the quality report says what is wrong with the model
        progress("activation-aware: skipped, the fp32 model's logits are not finite")
        return {"skipped": "the fp32 model's logits are not finite"}
    model = onnx.load(str(src / GRAPH_FILE))  # with its data: the weights are rewritten
    matmuls = weight_matmuls(model)
    labels = matmul_labels(model)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in matmuls}
    found = sites(model, matmuls)
    alphas = {}
    for site in found:
        w = np.concatenate([numpy_helper.to_array(inits[by_name[n].input[1]]) for n in site.matmuls], axis=1)
        x = activations.sample[site.matmuls[0]]
        s, alpha, _ = choose_scales(x, activations.mean_square[site.matmuls[0]], w, bits, fit_block(block, w.shape[0]))
        for name in site.matmuls:
            alphas[labels[name]] = alpha
        if alpha == 0:
            continue
        apply(model, site, s)
        for name in site.matmuls:
            activations.mean_square[name] = activations.mean_square[name] / s.astype(np.float64) ** 2
            activations.sample[name] = activations.sample[name] / s
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in (GRAPH_FILE, DATA_FILE):
            shutil.copy2(f, out / f.name)
    onnx.save_model(model, str(out / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    b = prompt_logits(fastllm.load(out), ids)
    worst = float(np.abs(a - b).max())
    tolerance = PRECISIONS["fp32"].tolerance * max(1.0, float(np.abs(a).max()))
    if not worst <= tolerance:
        raise ExportError(f"activation-aware scaling changed the fp32 model's logits by {worst:.2e} (allowed "
                          f"{tolerance:.2e}); quantize with --no-activation-aware and report this model")
    scaled_count = sum(1 for a_ in alphas.values() if a_)
    progress(f"activation-aware: {scaled_count} of {len(alphas)} MatMuls scaled ({len(matmuls) - len(alphas)} have "
             f"no place to fold it), fp32 logits within {worst:.1e}")
    return {"sites": len(found), "scaled": scaled_count, "alphas": alphas, "max_abs_dlogits": worst,
            "matmuls": len(matmuls)}

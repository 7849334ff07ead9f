"""Fitted block scales (export/blockwise.py), calibration activations (export/calibration.py) and activation-aware
scaling (export/activation_scaling.py): the packed bytes are what ONNX Runtime's MatMulNBits kernel reads, a fit
never loses to round-to-nearest, and the scaled fp32 graph computes the same function on every architecture."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import fastllm
from fastllm.export import blockwise
from fastllm.export.activation_scaling import output_error, scaled_copy
from fastllm.export.calibration import activation_stats
from fastllm.export.quantize import calibration_text
from fastllm.export.quantized_embedding import block_quantize
from fastllm.score import prompt_logits

CALIBRATION = calibration_text()[:20_000]


def _weights(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.integers(0, k, 8), rng.integers(0, n, 8)] *= 6  # a few outliers, as trained weights have
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, block", [(256, 32), (64, 32), (96, 64), (80, 32), (256, 128)])
def test_round_to_nearest_is_onnxruntime_s_own_bytes(bits, k, block):
    w = _weights(k, 24)
    packed, scales, _ = block_quantize(w, bits, block, True)  # ONNX Runtime's quantizer
    ours, our_scales = blockwise.quantize(w, bits, block, fit=False)
    assert ours.dtype == np.uint8 and ours.shape == packed.shape
    np.testing.assert_array_equal(ours, packed)
    np.testing.assert_array_equal(our_scales, scales)


def _matmul_nbits(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int,
                  block: int) -> np.ndarray:
    """x @ B through ONNX Runtime's MatMulNBits kernel (fp32 compute), B given as packed bytes and scales."""
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block)
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, block", [(256, 32), (80, 32)])
def test_the_kernel_computes_with_the_fitted_weights(bits, k, block):
    w, n = _weights(k, 40, seed=1), 40
    activations = np.linspace(0.1, 4.0, k) ** 2
    packed, scales = blockwise.quantize(w, bits, block, activations=activations)
    x = np.random.default_rng(2).standard_normal((5, k)).astype(np.float32)
    expected = x @ blockwise.dequantize(packed, scales, bits, k)
    np.testing.assert_allclose(_matmul_nbits(x, packed, scales, k, n, bits, block), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_fitted_scale_never_loses_to_round_to_nearest(bits):
    k, n, block = 256, 64, 32
    w = _weights(k, n, seed=3)
    importance = np.random.default_rng(4).uniform(0.1, 10, k)
    errors = {}
    for fit, weights in ((False, None), (True, None), (True, importance)):
        packed, scales = blockwise.quantize(w, bits, block, activations=weights, fit=fit)
        errors[fit, weights is not None] = ((blockwise.dequantize(packed, scales, bits, k) - w) ** 2
                                            * importance[:, None]).reshape(k // block, block, n).sum(axis=1)
    assert (errors[True, True] <= errors[False, False] * (1 + 1e-6)).all()  # per block: the grid holds RTN's scale
    assert errors[True, True].sum() < 0.9 * errors[False, False].sum()
    assert errors[True, True].sum() < errors[True, False].sum()  # weighing by the activations is what it minimises
    zeros = blockwise.quantize(np.zeros((64, 8), np.float32), bits, 32)
    assert not zeros[1].any() and not blockwise.dequantize(*zeros, bits, 64).any()


def test_calibration_statistics_are_the_activations_the_matmuls_read(exported, tmp_path):
    manifest, path = exported["LlamaForCausalLM"]
    stats = activation_stats(path, CALIBRATION, tmp_path / "probe", windows=2, window=64)
    engine = fastllm.load(path, threads=1)
    import onnx

    from fastllm.export.quantized_graph import weight_matmuls

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    matmuls = weight_matmuls(graph)
    assert set(stats.mean_square) == {n.name for n in matmuls} == set(stats.sample)
    inits = {t.name: t.dims for t in graph.graph.initializer}
    for node in matmuls:
        k = inits[node.input[1]][0]
        assert stats.mean_square[node.name].shape == (k,) and (stats.mean_square[node.name] >= 0).all()
        assert stats.sample[node.name].shape[1] == k and 0 < len(stats.sample[node.name]) <= 128
    # the first projection reads the first norm of the embeddings: computed here from the weights alone
    first = matmuls[0]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path / "model.onnx")).graph.initializer}
    ids = engine.encode(CALIBRATION)[:128]
    norm = next(n for n in graph.graph.node if first.input[0] in n.output)
    gamma = weights[norm.input[1]]
    embedding = next(w for w in weights.values() if w.ndim == 2 and w.shape[0] == manifest.vocab_size)
    x = embedding[ids].astype(np.float64)
    eps = next(a.f for a in norm.attribute if a.name == "epsilon")
    normed = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * gamma
    np.testing.assert_allclose(stats.mean_square[first.name], (normed ** 2).mean(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_activation_aware_scaling_keeps_the_fp32_function(exported, arch, graph, tmp_path):
    _, path = exported[arch, graph]
    stats = activation_stats(path, CALIBRATION, tmp_path / "probe", windows=2, window=64)
    before = {name: value.copy() for name, value in stats.mean_square.items()}
    done = scaled_copy(path, tmp_path / "scaled", stats, bits=4, block=32)
    ids = list(range(3, 40))
    a = prompt_logits(fastllm.load(path, threads=1), ids)
    b = prompt_logits(fastllm.load(tmp_path / "scaled", threads=1), ids)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    assert done["max_abs_dlogits"] <= 1e-4 * max(1.0, np.abs(a).max())
    if (arch, graph) != ("GPT2LMHeadModel", "portable"):  # its LayerNorm written out and a Gelu MLP: no place
        assert done["sites"] >= 1 and done["scaled"] >= 1
    changed = [name for name in before if not np.allclose(before[name], stats.mean_square[name])]
    assert len(changed) == done["scaled"]  # what the scaled MatMuls now read is reported for the fit


def test_the_chosen_scales_lower_the_output_error():
    rng = np.random.default_rng(5)
    k, n = 128, 64
    rms = np.exp(rng.normal(0, 1.0, k))  # activation features of very different sizes
    x = (rng.standard_normal((256, k)) * rms).astype(np.float32)
    w = _weights(k, n, seed=6)
    from fastllm.export.activation_scaling import choose_scales

    s, alpha, errors = choose_scales(x, rms ** 2, w, 4, 32)
    assert alpha > 0 and errors[alpha] < 0.9
    assert output_error(x, w, s, 4, 32) < output_error(x, w, np.ones(k, np.float32), 4, 32)

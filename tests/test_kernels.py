"""Each fused operator: ONNX Runtime's kernel against the PyTorch reference in kernels/, on random inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fastllm.kernels.fast_gelu import fast_gelu_reference
from fastllm.kernels.group_query_attention import gqa_reference
from fastllm.kernels.skip_norm import skip_layer_norm_reference, skip_rms_norm_reference

F32, I32 = TensorProto.FLOAT, TensorProto.INT32


def session(node, inputs, outputs) -> ort.InferenceSession:
    graph = helper.make_graph([node], "kernel", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def value(name, dtype=F32, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("heads, kv_heads, head_dim, rotary_dim, window, packed", [
    (4, 2, 16, 16, -1, False),   # GQA, full rotary
    (4, 2, 16, 16, -1, True),    # the same with q | k | v packed in one input
    (4, 4, 32, 16, -1, True),    # multi-head, partial rotary
    (6, 2, 16, 0, -1, False),    # no rotary (learned positions)
    (6, 2, 16, 0, -1, True),
    (4, 1, 16, 16, 5, True),     # sliding window
])
def test_group_query_attention_matches_reference(heads, kv_heads, head_dim, rotary_dim, window, packed):
    rng = np.random.default_rng(0)
    batch, capacity, max_pos = 3, 24, 64
    lengths = np.array([7, 3, 5])  # right padded to 7
    rotary = rotary_dim > 0
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    names += ["cos_cache", "sin_cache"] if rotary else []
    node = helper.make_node("GroupQueryAttention", ["query", "", ""] + names[3:] if packed else names,
                            ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary),
                            local_window_size=window)
    inputs = [value(n) for n in names[:5] if not (packed and n in ("key", "value"))]
    inputs += [value("seqlens_k", I32), value("total_sequence_length", I32)]
    inputs += [value("cos_cache"), value("sin_cache")] if rotary else []
    sess = session(node, inputs, [value("output"), value("present_key"), value("present_value")])

    angles = rng.uniform(0, 6.28, size=(max_pos, max(rotary_dim // 2, 1))).astype(np.float32)
    cos, sin = (np.cos(angles), np.sin(angles)) if rotary else (None, None)
    shape = (batch, kv_heads, capacity, head_dim)  # (batch, kv_heads, capacity, head_dim)
    cache_k, cache_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    ov_k, ov_v = ort.OrtValue.ortvalue_from_numpy(cache_k), ort.OrtValue.ortvalue_from_numpy(cache_v)
    ref_k, ref_v = torch.zeros(shape), torch.zeros(shape)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("past_key", ov_k)
    binding.bind_ortvalue_input("past_value", ov_v)
    binding.bind_ortvalue_output("present_key", ov_k)  # past and present share one buffer
    binding.bind_ortvalue_output("present_value", ov_v)
    if rotary:
        binding.bind_cpu_input("cos_cache", cos)
        binding.bind_cpu_input("sin_cache", sin)
    binding.bind_output("output")

    steps = [(int(lengths.max()), lengths - 1)] + [(1, lengths - 1 + i) for i in range(1, 6)]
    for seq, seqlens in steps:
        q = rng.normal(size=(batch, seq, heads * head_dim)).astype(np.float32)
        k = rng.normal(size=(batch, seq, kv_heads * head_dim)).astype(np.float32)
        v = rng.normal(size=(batch, seq, kv_heads * head_dim)).astype(np.float32)
        total = np.array(seqlens.max() + 1, np.int32)
        qkv = np.concatenate([q, k, v], axis=-1)
        feeds = {"query": qkv} if packed else {"query": q, "key": k, "value": v}
        for name, arr in {**feeds, "seqlens_k": seqlens.astype(np.int32), "total_sequence_length": total}.items():
            binding.bind_cpu_input(name, arr)
        binding.bind_output("output")  # shape changes between prompt and decode: let ORT allocate it
        sess.run_with_iobinding(binding)
        got = binding.get_outputs()[2].numpy()  # outputs come back in bind order
        query, key, value_ = ((torch.from_numpy(qkv), None, None) if packed else
                              (torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)))
        out, ref_k, ref_v = gqa_reference(
            query, key, value_, ref_k, ref_v, torch.from_numpy(seqlens),
            int(total), None if cos is None else torch.from_numpy(cos), None if sin is None else torch.from_numpy(sin),
            num_heads=heads, kv_heads=kv_heads, local_window_size=window)
        for b, n in enumerate(seqlens + 1):
            rows = seq if seq == 1 else lengths[b]  # prompt padding rows carry no meaning
            np.testing.assert_allclose(got[b, :rows], out[b, :rows].numpy(), atol=2e-5, rtol=1e-4)
            # the shared buffer holds exactly the reference cache at the row's valid positions
            np.testing.assert_allclose(cache_k[b, :, :n], ref_k[b, :, :n].numpy(), atol=1e-5)
            np.testing.assert_allclose(cache_v[b, :, :n], ref_v[b, :, :n].numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_skip_norm_matches_reference(kind):
    rng = np.random.default_rng(1)
    x, skip = (rng.normal(size=(2, 5, 64)).astype(np.float32) for _ in range(2))
    gamma, beta = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    op = "SkipSimplifiedLayerNormalization" if kind == "rms" else "SkipLayerNormalization"
    names = ["x", "skip", "gamma"] + (["beta"] if kind == "layer" else [])
    node = helper.make_node(op, names, ["out", "", "", "sum"], domain="com.microsoft", epsilon=1e-5)
    sess = session(node, [value(n) for n in names], [value("out"), value("sum")])
    feeds = {"x": x, "skip": skip, "gamma": gamma, **({"beta": beta} if kind == "layer" else {})}
    out, total = sess.run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if kind == "rms":
        ref_out, ref_total = skip_rms_norm_reference(t["x"], t["skip"], t["gamma"], 1e-5)
    else:
        ref_out, ref_total = skip_layer_norm_reference(t["x"], t["skip"], t["gamma"], t["beta"], 1e-5)
    np.testing.assert_allclose(out, ref_out.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(total, ref_total.numpy(), atol=1e-6)


def test_fast_gelu_matches_reference():
    rng = np.random.default_rng(2)
    x, bias = rng.normal(size=(2, 3, 128)).astype(np.float32) * 3, rng.normal(size=128).astype(np.float32)
    sess = session(helper.make_node("FastGelu", ["x", "bias"], ["y"], domain="com.microsoft"),
                   [value("x"), value("bias")], [value("y")])
    (y,) = sess.run(None, {"x": x, "bias": bias})
    np.testing.assert_allclose(y, fast_gelu_reference(torch.from_numpy(x), torch.from_numpy(bias)).numpy(),
                               atol=1e-5, rtol=1e-5)

"""The sampler's exp kernel: its hand-written ONNX graphs are valid models, and it computes exp(x * scale) (or exp
in place) and the block sums of exactly the rows it is asked to, reading what the buffers hold at each call."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fastllm.exp_kernel import ExpKernel, block_size, graph_bytes


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("block", [1024, None])
def test_the_graphs_are_valid_onnx_models(scaled, block):
    model = onnx.load_from_string(graph_bytes(scaled, block))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["Mul"] if scaled else []) + ["Exp"] + (["Reshape", "ReduceSum"] if block else [])
    assert [i.name for i in model.graph.input] == (["x", "scale"] if scaled else ["x"])
    assert [o.name for o in model.graph.output] == (["e", "sums"] if block else ["e"])


def test_block_sizes_divide_the_vocabulary_near_1024():
    assert block_size(49_152) == 1024 and block_size(151_936) == 1187 and block_size(32_000) == 1000
    assert block_size(128_256) == 1002 and block_size(50_257) == 1733 and block_size(3000) == 3000
    assert block_size(50_021) is None  # a prime: blocks of 1024 and a short last one, summed by the sampler


def _expected(x, scale):
    with np.errstate(over="ignore"):
        return np.exp((x * np.float32(scale)).astype(np.float64)).astype(np.float32)  # float32 multiply, as Mul


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vocab", [49_152, 151_936])
def test_scaled_rows_and_their_block_sums(threads, vocab):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, vocab)) * 4).astype(np.float32)
    scales = [1.0, 1.25, 0.5, 2.0]
    out = np.full((6, vocab), -1.0, dtype=np.float32)
    kernel = ExpKernel(vocab, threads)
    sums = np.empty((4, vocab // kernel.block), dtype=np.float32)
    kernel.scaled(x, scales, out, 1, 5, sums)
    expected = np.stack([_expected(row, s) for row, s in zip(x, scales)])
    np.testing.assert_allclose(out[1:5], expected, rtol=2e-6, atol=1e-37)
    np.testing.assert_array_equal(out[[0, 5]], -1.0)  # rows outside [start, stop) untouched
    np.testing.assert_allclose(sums, expected.astype(np.float64).reshape(4, -1, kernel.block).sum(axis=2),
                               rtol=1e-5)


def test_in_place_and_each_call_reads_what_the_buffers_hold_now():
    vocab = 2048
    kernel = ExpKernel(vocab, 1)
    buffer = np.zeros((3, vocab), dtype=np.float32)
    sums = np.empty((3, 1), dtype=np.float32)  # vocab <= 4096: one block
    kernel.in_place(buffer, 0, 3, sums)
    np.testing.assert_array_equal(buffer, 1.0)
    np.testing.assert_allclose(sums, vocab, rtol=1e-6)
    buffer[:] = 2.0  # written in place, as the sampler writes logits / T - offset before the call
    kernel.in_place(buffer, 0, 3, sums)
    np.testing.assert_allclose(buffer, np.exp(2.0), rtol=2e-6)
    first, second = np.full((1, vocab), 0.5, dtype=np.float32), np.full((1, vocab), -1.0, dtype=np.float32)
    one = np.empty((1, 1), dtype=np.float32)
    kernel.scaled(first, 2.0, buffer, 1, 2, one)  # another row range: its own binding
    np.testing.assert_allclose(buffer[1], np.e, rtol=2e-6)
    kernel.scaled(second, 1.0, buffer, 1, 2, one)  # another input buffer for the same range
    np.testing.assert_allclose(buffer[1], np.exp(-1.0), rtol=2e-6)
    np.testing.assert_allclose(one, vocab * np.exp(-1.0), rtol=1e-5)
    np.testing.assert_allclose(buffer[[0, 2]], np.exp(2.0), rtol=2e-6)
    second[:] = 0.25  # the same input memory rewritten (a decode loop's logits buffer): read afresh
    kernel.scaled(second, 4.0, buffer, 1, 2, one)
    np.testing.assert_allclose(buffer[1], np.e, rtol=2e-6)
    kernel.scaled(second[:, :], 1.0, buffer, 1, 2, one)  # a new view of that memory
    np.testing.assert_allclose(buffer[1], np.exp(0.25), rtol=2e-6)
    kernel.scaled(first, 1.0, buffer, 1, 2, one)  # and back to the first array
    np.testing.assert_allclose(buffer[1], np.exp(0.5), rtol=2e-6)


def test_buffers_it_cannot_bind_are_refused():
    kernel = ExpKernel(100, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.in_place(np.zeros((4, 200), dtype=np.float32)[:, ::2], 0, 4, np.empty((4, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        kernel.in_place(np.zeros((4, 100)), 0, 4, np.empty((4, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="sums"):
        kernel.in_place(np.zeros((4, 100), dtype=np.float32), 0, 4, np.empty((3, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="x must be"):
        kernel.scaled(np.zeros((2, 100)), 1.0, np.zeros((4, 100), dtype=np.float32), 0, 2,
                      np.empty((2, 1), dtype=np.float32))

"""export/baselines.py reproduces llama.cpp's Q8_0, Q4_0 and Q4_K block formats: known values by hand, and
against gguf's independent numpy codec (llama.cpp's own Python package)."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm.export import baselines

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize


def _weights(rows=64, k=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = np.linspace(-1, 1, 32)  # an exact half-step pattern (ties in the rounding)
    w[2, 32:64] = 3.0  # a constant block
    w[3, :] = np.abs(w[3, :])  # a row without negative values (Q4_K's min clamps to 0)
    w[4, 100] = 40.0  # an outlier
    return w


def test_q8_0_known_values():
    block = np.arange(-16, 16, dtype=np.float32)[None] * (127 / 16)  # max |x| = 127: d = 1, exact
    assert np.array_equal(baselines.q8_0(block), block.round())
    half = np.full((1, 32), 0.5, dtype=np.float32)
    half[0, 0] = 127.0  # d = 1: 0.5 rounds away from zero, to 1 (np.round would give 0)
    assert baselines.q8_0(half)[0, 1] == 1.0


def test_q4_0_known_values():
    block = np.tile(np.arange(-8, 8, dtype=np.float32), 2)[None] * 0.25  # entry of largest magnitude: -2.0
    assert np.array_equal(baselines.q4_0(block), block)  # d = 0.25, every value on the grid
    flipped = -block  # largest magnitude is +2.0 now: d = -0.25, the grid is mirrored and -2.0 -> q = 0 ... fine
    out = baselines.q4_0(flipped)
    assert out[0, 0] == 2.0 and np.abs(out - flipped).max() <= 0.25


@pytest.mark.parametrize("name, qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q5_0", T.Q5_0)])
def test_q8_0_q4_0_q5_0_equal_ggufs_codec(name, qtype):
    w = _weights()
    ours = getattr(baselines, name)(w)
    theirs = dequantize(quantize(w, qtype), qtype)
    assert np.array_equal(ours, theirs)


def test_q4_k_bytes_decode_to_our_values_with_ggufs_decoder():
    w = _weights()
    packed = baselines.pack_q4_k(w)
    assert packed.shape == (w.size // 256, 144) and packed.dtype == np.uint8  # 4.5 bits per weight
    decoded = dequantize(packed.reshape(w.shape[0], -1), T.Q4_K)
    assert np.array_equal(decoded, baselines.q4_k(w))


def test_q4_k_fits_better_than_q4_0_at_the_same_bits():
    w = np.random.default_rng(1).standard_normal((128, 1024)).astype(np.float32) * 0.05
    err = {name: float(np.square(getattr(baselines, name)(w) - w).mean()) for name in ("q4_0", "q4_k")}
    assert err["q4_k"] < 0.9 * err["q4_0"]
    assert np.square(baselines.q8_0(w) - w).mean() < err["q4_k"] / 100


def test_fake_quantize_blocks_run_along_the_dot_product_axis():
    w = _weights(rows=64, k=256)
    kn = np.ascontiguousarray(w.T)  # an ONNX MatMul weight (K, N)
    assert np.array_equal(baselines.fake_quantize(kn, "q4_k", axis=0), baselines.q4_k(w).T)
    assert np.array_equal(baselines.fake_quantize(w, "q4_0", axis=1), baselines.q4_0(w))
    with pytest.raises(ValueError, match="multiple of 256"):
        baselines.fake_quantize(w[:, :96], "q4_k", axis=1)

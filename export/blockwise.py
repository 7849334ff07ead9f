"""Block-wise symmetric int4 / int8 weights in MatMulNBits' layout, with each block's scale fitted.

ONNX Runtime's quantizer rounds to nearest with the scale set by the block's entry of largest magnitude (d = m / -8
for int4, m / -128 for int8, so m lands on the lowest level). That scale spends the whole range on one outlier;
a slightly smaller or larger one often leaves less error in the other 31 entries of the block. Here each block
tries a grid of scales around it and keeps the one with the least weighted squared error, where the weight of
input feature k is the mean of x_k^2 over calibration activations (export/calibration.py) when given: the error
that reaches the MatMul's output, E[(x . (w - q))^2], is sum_k E[x_k^2] (w_k - q_k)^2 when features are
uncorrelated. Without activations every feature weighs the same (plain least squares).

The result is written into the MatMulNBits nodes ONNX Runtime's quantizer made (same packed shape, same scales
shape, no zero points: the kernel's default 8 / 128), so graph, kernels and speed are unchanged.

Layout (MatMulNBits, K the input features, N the outputs): B (N, blocks, block * bits / 8) uint8, block b of
output n holding q[n, b * block : (b + 1) * block] (int4: two per byte, the lower index in the low nibble; stored
as q + 8 / q + 128), K padded to a whole block with zero bytes; scales (N, blocks) float32.
"""

from __future__ import annotations

import numpy as np

# the grid of scales tried per block, as multiples of the round-to-nearest scale: 0.80, 0.81, ... 1.20
SCALE_GRID = np.round(np.arange(0.80, 1.2001, 0.01), 2).astype(np.float32)
_CHUNK = 1 << 13  # blocks fitted per numpy pass (bounds the scratch to ~50 MB per temporary)


def levels(bits: int) -> int:
    """The zero point and the magnitude of the lowest level: 8 for int4, 128 for int8."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 1 << (bits - 1)


def _blocks(weight_kn: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """(K, N) -> (N * blocks, block) float32 rows of blocks along K (zero-padded), and the block count."""
    k, n = weight_kn.shape
    blocks = -(-k // block)
    w = np.zeros((n, blocks * block), dtype=np.float32)
    w[:, :k] = np.asarray(weight_kn, dtype=np.float32).T
    return w.reshape(n * blocks, block), blocks


def fit_scales(blocks: np.ndarray, bits: int, importance: np.ndarray | None = None,
               grid: np.ndarray = SCALE_GRID) -> np.ndarray:
    """The scale of each block (rows of `blocks` (M, block)) minimising sum_j importance_j (w_j - d q_j)^2 over d in
    grid * d0, d0 the round-to-nearest scale (m / -zero, m the entry of largest magnitude, sign kept); importance
    (M, block) or None (all 1). Returns (M,) float32. A block of zeros gets scale 0."""
    zero = levels(bits)
    top = np.abs(blocks).argmax(axis=1)
    d0 = blocks[np.arange(len(blocks)), top] / np.float32(-zero)  # (M,)
    best = d0.copy()
    if len(grid) == 1 and grid[0] == 1:
        return best
    for lo in range(0, len(blocks), _CHUNK):
        w = blocks[lo : lo + _CHUNK]
        weight = None if importance is None else importance[lo : lo + _CHUNK]
        d = d0[lo : lo + _CHUNK, None] * grid[None, :]  # (m, candidates)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.clip(np.round(w[:, None, :] * inv[:, :, None]), -zero, zero - 1)  # (m, candidates, block)
        err = (w[:, None, :] - q * d[:, :, None]) ** 2
        err = (err if weight is None else err * weight[:, None, :]).sum(axis=2)  # (m, candidates)
        best[lo : lo + _CHUNK] = d[np.arange(len(w)), err.argmin(axis=1)]
    return best


def quantize(weight_kn: np.ndarray, bits: int, block: int, *, activations: np.ndarray | None = None,
             fit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float32 -> MatMulNBits' (packed (N, blocks, blob) uint8, scales (N, blocks) float32), symmetric.

    activations: (K,) mean of x_k^2 per input feature, the weight of each entry's error (None: plain least squares);
    fit False: round to nearest with the largest-magnitude scale (ONNX Runtime's own choice)."""
    k, n = weight_kn.shape
    zero = levels(bits)
    w, blocks = _blocks(weight_kn, block)
    importance = None
    if activations is not None and np.isfinite(activations).all():  # (a broken model's are not: plain fit)
        a = np.zeros(blocks * block, dtype=np.float32)
        a[:k] = np.maximum(np.asarray(activations, dtype=np.float32), 0)
        a = a / max(float(a.mean()), 1e-30)  # only the relative weights matter
        importance = np.broadcast_to(a.reshape(1, blocks, block), (n, blocks, block)).reshape(n * blocks, block)
    scales = fit_scales(w, bits, importance, SCALE_GRID if fit else np.ones(1, dtype=np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scales == 0, np.float32(0), np.float32(1) / scales)
    q = (np.clip(np.round(w * inv[:, None]), -zero, zero - 1) + zero).astype(np.uint8)  # (N * blocks, block)
    q.reshape(n, blocks * block)[:, k:] = 0  # the padding past K: zero bytes, as ONNX Runtime writes it
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.reshape(n, blocks, -1), scales.reshape(n, blocks).astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The (K, N) float32 matrix MatMulNBits computes with (symmetric: the default zero point)."""
    n, blocks, _ = packed.shape
    zero = levels(bits)
    q = packed.reshape(n * blocks, -1)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=2).reshape(n * blocks, -1)
    values = (q.astype(np.float32) - zero) * scales.reshape(-1, 1).astype(np.float32)
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)

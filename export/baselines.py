"""llama.cpp's block formats in numpy, as reference points for the quality report: Q8_0, Q4_0 and Q4_K.

Each function takes a weight matrix whose rows are the dot-product axis' blocks (numpy (rows, K), K the input
features, as llama.cpp lays out a linear layer's weight) and returns what llama.cpp would compute with after
quantizing it: the dequantized float32 matrix ("fake quantization"). Written from the formats' definitions:

- Q8_0: blocks of 32; scale d = max|x| / 127 stored as fp16; q = round(x / d) (half away from zero), the division
  by the fp32 d. 8.5 bits per weight.
- Q4_0: blocks of 32; d = m / -8 where m is the block's entry of largest magnitude (its sign kept), fp16;
  q = min(15, trunc(x / d + 8.5)), the value (q - 8) d. 4.5 bits per weight.
- Q5_0: blocks of 32; d = m / -16; q = min(31, trunc(x / d + 16.5)), the value (q - 16) d. 5.5 bits per weight:
  llama.cpp's fallback for a Q4_K matrix whose rows are not a multiple of 256 (hidden sizes such as 64 or 384).
- Q4_K: super-blocks of 256 = 8 sub-blocks of 32, each sub-block x = d_s q - m_s with q in 0..15. Per sub-block
  a scale and a min are fitted by weighted least squares (weights |x| + rms of the sub-block) over a grid of 21
  candidate step sizes around (max - min) / 15; the 8 scales and 8 mins are then quantized to 6 bits against the
  super-block's fp16 d and dmin, and q recomputed with the quantized scales. 144 bytes per 256 weights: 4.5 bits.

`pack_q4_k` writes the Q4_K bytes of llama.cpp's block layout (d, dmin, 12 bytes of packed 6-bit scales/mins, 128
bytes of nibbles), so the format can be checked against an independent decoder (tests use gguf's).
"""

from __future__ import annotations

import math

import numpy as np

QK = 32  # block of Q8_0 / Q4_0, sub-block of Q4_K
QK_K = 256  # super-block of Q4_K
BITS_PER_WEIGHT = {"q8_0": 8.5, "q5_0": 5.5, "q4_0": 4.5, "q4_k": 4.5}
FALLBACK = {"q4_k": "q5_0"}  # llama.cpp's choice for a matrix whose dot-product axis is not a multiple of 256


def _blocks(w: np.ndarray, size: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % size:
        raise ValueError(f"rows of a multiple of {size} values expected, got shape {w.shape}")
    return w.reshape(-1, size)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.round rounds them to even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def q8_0(w: np.ndarray) -> np.ndarray:
    b = _blocks(w, QK)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_away(b * inv)
    return (q * _fp16(d)).reshape(np.shape(w))


def _signed_max(w: np.ndarray, levels: int) -> np.ndarray:
    """Q4_0 (levels 16) and Q5_0 (32): d from the block's entry of largest magnitude (the first, sign kept)."""
    b = _blocks(w, QK)
    half = levels // 2
    m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = m / np.float32(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.float32(levels - 1), np.trunc(b * inv + np.float32(half + 0.5)))
    return ((q - half) * _fp16(d)).reshape(np.shape(w))


def q4_0(w: np.ndarray) -> np.ndarray:
    return _signed_max(w, 16)


def q5_0(w: np.ndarray) -> np.ndarray:
    return _signed_max(w, 32)


def _fit_scale_min(x: np.ndarray, weights: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                   nstep: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (sub-blocks): scale s >= 0 and min m >= 0 with x ~ s q - m, q = clamp(rint((x + m) / s)),
    minimising sum w (s q - m - x)^2 over candidate step sizes (nmax + rmin + i rdelta) / (max - min), i = 0..nstep,
    each refitted by least squares. Rows with max == min get s = 0, m = -min."""
    lo = np.minimum(x.min(axis=1), 0)
    hi = x.max(axis=1)
    span = hi - lo
    flat = span == 0
    span = np.where(flat, 1, span)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)

    iscale = nmax / span
    scale = 1 / iscale
    q = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = (weights * (scale[:, None] * q + lo[:, None] - x) ** 2).sum(axis=1)
    best_scale, best_min = scale, lo
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        q = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (weights * q).sum(1), (weights * q * q).sum(1), (weights * q * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the min is an offset below zero: clamp it and refit the scale alone
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = np.where(positive, 0, this_min)
        err = (weights * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, this_scale, best_scale)
        best_min = np.where(better, this_min, best_min)
    best_scale = np.where(flat, 0, best_scale)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _q4_k_parts(w: np.ndarray):
    """Q4_K of w: per super-block d, dmin (fp16-rounded), the 6-bit scales and mins (n, 8), and q (n, 256)."""
    x = _blocks(w, QK_K).reshape(-1, 8, QK)
    sub = x.reshape(-1, QK)
    rms = np.sqrt((sub * sub).mean(axis=1, keepdims=True))
    scales, mins = _fit_scale_min(sub, rms + np.abs(sub))
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales))
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins))
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    step = (d[:, None] * ls)[:, :, None]  # (n, 8, 1)
    offset = (dmin[:, None] * lm)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.clip(np.rint((x + offset) / np.where(step > 0, step, 1)), 0, 15), 0)
    return d, dmin, ls.astype(np.uint8), lm.astype(np.uint8), q.reshape(-1, QK_K).astype(np.uint8)


def q4_k(w: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _q4_k_parts(w)
    step = (d[:, None] * ls)[:, :, None]
    offset = (dmin[:, None] * lm)[:, :, None]
    return (step * q.reshape(-1, 8, QK) - offset).astype(np.float32).reshape(np.shape(w))


def pack_q4_k(w: np.ndarray) -> np.ndarray:
    """The Q4_K bytes of w, (super-blocks, 144) uint8, in llama.cpp's block_q4_K layout."""
    d, dmin, ls, lm, q = _q4_k_parts(w)
    n = d.shape[0]
    scales = np.zeros((n, 12), dtype=np.uint8)
    scales[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    q = q.reshape(n, 4, 2, QK)  # per 64 values: the first 32 in the low nibbles, the next 32 in the high ones
    nibbles = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    head = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(n, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)
    return np.concatenate([head, scales, nibbles], axis=1)


FORMATS = {"q8_0": (q8_0, QK), "q5_0": (q5_0, QK), "q4_0": (q4_0, QK), "q4_k": (q4_k, QK_K)}


def fake_quantize(w: np.ndarray, name: str, *, axis: int) -> np.ndarray:
    """w quantized to format `name` with blocks along `axis` (the dot-product axis: 0 for an ONNX MatMul weight
    (K, N), 1 for an embedding table (V, H)), returned dequantized in w's own layout. Raises ValueError when that
    axis is not a multiple of the format's block."""
    fn, size = FORMATS[name]
    w = np.asarray(w, dtype=np.float32)
    if w.shape[axis] % size:
        raise ValueError(f"{name} needs the dot-product axis to be a multiple of {size}, got {w.shape[axis]}")
    rows = w.T if axis == 0 else w
    out = fn(np.ascontiguousarray(rows))
    return np.ascontiguousarray(out.T if axis == 0 else out)


# -- a model directory whose weights are fake-quantized, for the quality report ------------------------------------
def matrix_axes(model) -> dict[str, int]:
    """The matrices llama.cpp quantizes, as {initializer name: dot-product axis}: the MatMul weights (K, N) along 0,
    an untied embedding table (vocab, hidden) along 1 (a tied one is the LM head's MatMul weight already)."""
    from fastllm.export.quantized_embedding import find_embedding
    from fastllm.export.quantized_graph import weight_matmuls

    axes = {node.input[1]: 0 for node in weight_matmuls(model)}
    embedding = find_embedding(model.graph)
    if embedding is not None and not embedding.transposed:
        axes[embedding.weight] = 1
    return axes


def matrix_weights(fp32_dir) -> int:
    """How many weights those matrices hold (the graph read without its data)."""
    from pathlib import Path

    import onnx

    model = onnx.load(str(Path(fp32_dir) / "model.onnx"), load_external_data=False)
    axes = matrix_axes(model)
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.name in axes)


def fake_quantized_copy(fp32_dir, out_dir, name: str) -> dict:
    """Copy the fp32 model directory `fp32_dir` to `out_dir` (which must not exist) with every weight matrix llama.cpp
    quantizes (the MatMul weights, the LM head and the embedding table) replaced by its `name` fake-quantization;
    norms and biases stay fp32, as in llama.cpp's files. A matrix whose dot-product axis the format's blocks do not
    divide takes llama.cpp's fallback format (FALLBACK), and the count of each is returned with the bits per
    weight of the whole: {"format", "matrices": {format: count}, "weights", "bits_per_weight"}."""
    import shutil
    from pathlib import Path

    import onnx
    from onnx import numpy_helper

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; fake_quantized_copy writes a new directory only")
    if name not in FORMATS:
        raise ValueError(f"unknown baseline format {name!r}; choose one of {', '.join(FORMATS)}")
    model = onnx.load(str(fp32_dir / "model.onnx"))  # with its external data
    axes = matrix_axes(model)
    counts: dict[str, int] = {}
    weights, bits = 0, 0.0
    for tensor in model.graph.initializer:
        if tensor.name not in axes:
            continue
        w = numpy_helper.to_array(tensor)
        used = name
        while w.shape[axes[tensor.name]] % FORMATS[used][1]:
            if used not in FALLBACK:
                raise ValueError(f"{tensor.name} {w.shape}: no block of {name} or its fallback divides "
                                 f"{w.shape[axes[tensor.name]]}")
            used = FALLBACK[used]
        tensor.CopyFrom(numpy_helper.from_array(fake_quantize(w, used, axis=axes[tensor.name]), tensor.name))
        counts[used] = counts.get(used, 0) + 1
        weights += w.size
        bits += w.size * BITS_PER_WEIGHT[used]
    partial = out_dir.with_name(out_dir.name + ".partial")  # renamed when whole: no half-written directory
    partial.mkdir(parents=True)  # raises when it exists: never written over
    try:
        for f in fp32_dir.iterdir():
            if f.is_file() and f.name not in ("model.onnx", "model.onnx.data"):
                shutil.copy2(f, partial / f.name)
        onnx.save(model, str(partial / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"format": name, "matrices": counts, "weights": weights, "bits_per_weight": bits / max(weights, 1)}

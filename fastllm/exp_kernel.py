"""exp(logits / T) and its block sums over rows of logits, run by ONNX Runtime (MLAS's vectorised Exp).

The sampler's one full-vocabulary transcendental pass. numpy's float32 exp is vectorised only where the CPU has
AVX-512: on an AVX2 machine (AMD EPYC Zen 3) it takes 2.5 ns per entry, 123 us for one 49,152-entry row, where
ONNX Runtime's takes ~0.7 (37 us), and the multiply by 1 / T and the block sums in the same call cost about nothing
more (each is a numpy call of its own otherwise); a block of rows is split over the session's threads. The graphs
are written here as ONNX protobuf bytes, so the runtime needs no `onnx` package; tests check them with
`onnx.checker`. Inputs and outputs are bound to the caller's arrays: no copy, no allocation per call.
"""

from __future__ import annotations

import math

import numpy as np

from fastllm.session import ort

_FLOAT, _INT64 = 1, 7  # onnx.TensorProto data types
# Entries from which a call is split over the kernel's threads: waking a sleeping thread costs more than it saves
# below (AMD EPYC Zen 3, 2 threads: one 49,152 row 25 us alone, 31 us split; one 151,936 row 106 us alone, 70 split)
_SPLIT_FROM = 100_000
_OPSET = 13


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _int_field(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes_field(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, dims: tuple) -> bytes:
    """ValueInfoProto of a float tensor; dims: ints (fixed) or strings (symbolic)."""
    shape = b"".join(_bytes_field(1, _int_field(1, d) if isinstance(d, int) else _bytes_field(2, d)) for d in dims)
    tensor_type = _int_field(1, _FLOAT) + _bytes_field(2, shape)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def _int64_tensor(name: str, values: tuple[int, ...]) -> bytes:
    """TensorProto: dims, data_type INT64, int64_data (packed), name."""
    packed = b"".join(_varint(v & 0xFFFFFFFFFFFFFFFF) for v in values)
    return _int_field(1, len(values)) + _int_field(2, _INT64) + _bytes_field(7, packed) + _bytes_field(8, name)


def _node(op: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> bytes:
    return (b"".join(_bytes_field(1, i) for i in inputs) + b"".join(_bytes_field(2, o) for o in outputs)
            + _bytes_field(4, op))


def graph_bytes(scaled: bool, block: int | None) -> bytes:
    """The ModelProto: e (rows, vocab) = Exp(x * scale) (scaled: x (rows, vocab), scale (rows, 1)) or Exp(x), and
    when `block` divides the vocabulary, sums (rows, vocab / block) = the sums of e over blocks of that size."""
    nodes = [("Mul", ("x", "scale"), ("scaled",)), ("Exp", ("scaled",), ("e",))] if scaled else \
        [("Exp", ("x",), ("e",))]
    inputs = [("x", ("rows", "vocab"))] + ([("scale", ("rows", 1))] if scaled else [])
    outputs = [("e", ("rows", "vocab"))]
    initializers = b""
    if block:
        nodes += [("Reshape", ("e", "blocked_shape"), ("blocked",)), ("ReduceSum", ("blocked", "last_axis"), ("sums",))]
        outputs.append(("sums", ("rows", "blocks")))
        initializers = (_bytes_field(5, _int64_tensor("blocked_shape", (0, -1, block)))
                        + _bytes_field(5, _int64_tensor("last_axis", (2,))))
    keepdims_0 = _bytes_field(5, _bytes_field(1, "keepdims") + _int_field(3, 0) + _int_field(20, 2))  # INT attribute
    graph = (b"".join(_bytes_field(1, _node(*n) + (keepdims_0 if n[0] == "ReduceSum" else b"")) for n in nodes)
             + _bytes_field(2, "fastllm_exp") + initializers
             + b"".join(_bytes_field(11, _value_info(*i)) for i in inputs)
             + b"".join(_bytes_field(12, _value_info(*o)) for o in outputs))
    # ModelProto: ir_version 7, opset_import {domain "", version}, producer_name, graph
    return (_int_field(1, 7) + _bytes_field(8, _bytes_field(1, "") + _int_field(2, _OPSET))
            + _bytes_field(2, "fastllm") + _bytes_field(7, graph))


def block_size(vocab: int) -> int | None:
    """The block size of the draws' two-level search: a divisor of the vocabulary near 1024 (so the kernel sums
    whole blocks), or None when it has none in [256, 4096] (then blocks of 1024 and a short last one, summed by
    the caller)."""
    if vocab <= 4096:
        return vocab
    divisors = [b for b in range(256, 4097) if vocab % b == 0]
    return min(divisors, key=lambda b: abs(math.log(b / 1024))) if divisors else None


class ExpKernel:
    """For rows of a vocabulary-wide float32 buffer: e = exp(x * scale) from logits x (`scaled`), or e = exp(e) in
    place (`in_place`, where the caller has written logits / T - offset itself), and the block sums of e when the
    vocabulary has a `block` size.

    ONNX Runtime sessions on the CPU, one thread for a call of fewer than _SPLIT_FROM entries and `threads` for a
    larger one, not spinning after a call, so they never hold a core the model's session needs.
    The IO binding of each output range is made once and kept with a reference to its buffers (the caller's
    scratch: a bounded few); the logits input is rebound each call (cheap).
    """

    def __init__(self, vocab: int, threads: int = 1):
        self.vocab = vocab
        self.block = block_size(vocab)
        self.threads = max(1, int(threads))
        self._sessions: dict[tuple[bool, int], ort.InferenceSession] = {}
        self._bindings: dict[tuple, tuple] = {}

    def _session(self, scaled: bool, rows: int) -> ort.InferenceSession:
        threads = 1 if rows * self.vocab < _SPLIT_FROM else self.threads
        key = (scaled, threads)
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self._sessions[key] = ort.InferenceSession(graph_bytes(scaled, self.block), options,
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def _binding(self, scaled: bool, out: np.ndarray, start: int, stop: int, sums: np.ndarray | None):
        key = (scaled, id(out), start, stop)
        bound = self._bindings.get(key)
        if bound is None:
            _check_buffer(out)
            if len(self._bindings) >= 256:
                self._bindings.clear()
            session = self._session(scaled, stop - start)
            rows = out[start:stop]
            io = session.io_binding()
            io.bind_output("e", "cpu", 0, np.float32, list(rows.shape), rows.ctypes.data)
            scale = np.empty((stop - start, 1), dtype=np.float32)
            if scaled:
                io.bind_cpu_input("scale", scale)
            else:
                io.bind_cpu_input("x", rows)  # in place: e's own memory
            if self.block:
                if sums is None or sums.shape != (stop - start, self.vocab // self.block) or \
                        not sums.flags.c_contiguous or sums.dtype != np.float32:
                    raise ValueError(f"sums must be a C-contiguous ({stop - start}, {self.vocab // self.block}) "
                                     f"float32 array")
                io.bind_output("sums", "cpu", 0, np.float32, list(sums.shape), sums.ctypes.data)
            bound = self._bindings[key] = (session, io, scale, out, sums)
        elif self.block and bound[4] is not sums:
            raise ValueError("a kernel output range is bound to one sums array; pass the same one")
        return bound

    def scaled(self, x: np.ndarray, scale, out: np.ndarray, start: int, stop: int,
               sums: np.ndarray | None = None) -> None:
        """out[start:stop] = exp(x * scale) for x (stop - start, vocab) float32 C-contiguous (a row range of
        logits), scale a number or one per row; sums[i, b] = the sum of block b of row start + i (when blocked)."""
        session, io, scales, _, _ = self._binding(True, out, start, stop, sums)
        if not (x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (stop - start, self.vocab)):
            raise ValueError(f"x must be C-contiguous float32 of shape {(stop - start, self.vocab)}, got "
                             f"{x.dtype} {x.shape}")
        scales[:, 0] = scale
        io.bind_cpu_input("x", x)
        session.run_with_iobinding(io)

    def in_place(self, out: np.ndarray, start: int, stop: int, sums: np.ndarray | None = None) -> None:
        """out[start:stop] = exp(out[start:stop]); sums as in `scaled`."""
        session, io, _, _, _ = self._binding(False, out, start, stop, sums)
        session.run_with_iobinding(io)


def _check_buffer(out: np.ndarray) -> None:
    if not (out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous):
        raise ValueError(f"the exp kernel writes a C-contiguous (rows, vocab) float32 buffer, got {out.dtype} "
                         f"{out.shape}")

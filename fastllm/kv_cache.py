"""The per-request KV cache, kept as OrtValues on the session's device and bound through IO binding."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from fastllm.manifest import Manifest


class KVCache:
    """Portable graph: each step's `present` tensors (past + new positions) become the next step's `past`.

    The tensors never leave the device: the outputs of one run are bound as the inputs of the next.
    """

    def __init__(self, manifest: Manifest, device, batch: int):
        self.manifest = manifest
        self.device = device
        self.batch = batch
        empty = np.zeros((batch, manifest.num_kv_heads, 0, manifest.head_dim), np.dtype(manifest.kv_dtype))
        # 2 per layer (key, value), each (batch, kv_heads, length, head_dim)
        self.tensors: list[ort.OrtValue] = [device.ortvalue(empty) for _ in range(2 * manifest.num_layers)]
        self.length = 0  # positions held (padding included)

    def bind(self, binding: ort.IOBinding) -> None:
        for layer in range(self.manifest.num_layers):
            for j, (past, present) in enumerate(zip(self.manifest.past_names(layer), self.manifest.present_names(layer))):
                binding.bind_ortvalue_input(past, self.tensors[2 * layer + j])
                binding.bind_output(present, self.device.kind, self.device.index)

    def advance(self, presents: list[ort.OrtValue], new_positions: int) -> None:
        self.tensors = presents
        self.length += new_positions

"""What the numbers were measured on: CPU model, cores, memory, OS, and the versions of every package involved."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from fastllm import native

PACKAGES = ("fastllm", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "transformers", "onnx",
            "optimum", "onnxruntime-genai", "llama-cpp-python", "gguf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _cpu_flags() -> list[str]:
    """The instruction-set flags that decide fp32/bf16 matmul speed."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sampler": native.description(),  # C kernels or numpy + ONNX Runtime: sampled timings depend on it
    }


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out

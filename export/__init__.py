"""PyTorch -> ONNX export for fastllm: load, adapt, trace, describe, verify, commit (see pipeline.py)."""

from export.pipeline import export_model, export_pretrained
from export.registry import register, supported

__all__ = ["export_model", "export_pretrained", "register", "supported"]

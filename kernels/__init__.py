"""Fused operators, each once: a PyTorch reference (used in eager runs and tests) and its lowering to an
ONNX Runtime contrib op through the TorchScript exporter's `symbolic` hook. tests/test_kernels.py checks each
ONNX Runtime kernel against its reference."""

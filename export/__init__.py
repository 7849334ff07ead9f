"""PyTorch -> ONNX export for fastllm: load, adapt, trace, describe, verify, commit (see pipeline.py).

Attributes load lazily so that `export.cli` (registered as a `fastllm` subcommand) costs no torch import
until an export actually runs.
"""

__all__ = ["export_model", "export_pretrained", "register", "supported"]


def __getattr__(name):
    if name in ("export_model", "export_pretrained"):
        from export import pipeline

        return getattr(pipeline, name)
    if name in ("register", "supported"):
        from export import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")

"""PyTorch -> ONNX export for fastllm: load, adapt, trace, optimize, describe, verify, quantize, commit (see
pipeline.py).

Attributes load lazily so that `export.cli` (registered as a `fastllm` subcommand) costs no torch import
until an export actually runs.
"""

__all__ = ["export_model", "export_pretrained", "exporter_fingerprint", "register", "supported"]


def exporter_fingerprint() -> str:
    """A hash of the exporter's code (export/ and kernels/): caches of exported models key on it, so a changed
    exporter (a new graph) exports afresh instead of re-using an old graph."""
    import hashlib
    import importlib.util
    from pathlib import Path

    h = hashlib.sha256()
    for package in ("fastllm.export", "fastllm.kernels"):
        for location in importlib.util.find_spec(package).submodule_search_locations:
            for source in sorted(Path(location).rglob("*.py")):
                h.update(source.read_bytes())
    return h.hexdigest()[:12]


def __getattr__(name):
    if name in ("export_model", "export_pretrained"):
        from fastllm.export import pipeline

        return getattr(pipeline, name)
    if name in ("register", "supported"):
        from fastllm.export import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")

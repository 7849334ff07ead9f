"""The model the project trains and ships (models/pydoc-llama, a Hugging Face directory), exported on first use.

`fastllm generate "prompt"` with no model directory asks the `fastllm.models` entry point group for a default
model; this module answers it, so the runtime itself never imports the exporter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "pydoc-llama"


def cache_root() -> Path:
    return Path(os.environ.get("FASTLLM_CACHE", Path.home() / ".cache" / "fastllm"))


def fingerprint(directory: Path) -> str:
    """Of the weights and of the code that exports them: a changed exporter (a new graph) exports afresh."""
    from fastllm.export import exporter_fingerprint

    h = hashlib.sha256(exporter_fingerprint().encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()[:12]


def default_model(progress=lambda line: print(line, file=sys.stderr)) -> Path:
    """The exported bundled model, exporting (and verifying) it into the cache the first time."""
    from fastllm.errors import ModelLoadError

    if not (BUNDLED / "model.safetensors").is_file():
        raise ModelLoadError(f"the bundled model is missing at {BUNDLED}; pass a model directory instead")
    out = cache_root() / "models" / f"pydoc-llama-{fingerprint(BUNDLED)}"
    if not (out / "fastllm.json").is_file():
        from fastllm.export import export_model

        progress(f"[fastllm] first use: exporting the bundled model to {out}")
        export_model(BUNDLED, out, overwrite=True, progress=lambda line: progress(f"[export] {line}"))
    for stale in out.parent.glob("pydoc-llama-*"):  # exports of older weights or by an older exporter
        if stale != out and (stale / "fastllm.json").is_file():
            shutil.rmtree(stale, ignore_errors=True)
    return out

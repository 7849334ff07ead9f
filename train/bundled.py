"""The model the project trains (models/pydoc-llama, a Hugging Face directory) and the export of it that ships
inside the `fastllm` package (fastllm/data/pydoc-llama), so that `fastllm generate "prompt"` works from a plain
wheel install with the runtime dependencies alone.

    python -m fastllm.train.bundled      # re-export the shipped copy after a change to the exporter

tests/test_bundled.py keeps the shipped copy in step: a fresh export must give the same logits and greedy tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "pydoc-llama"  # the trained Hugging Face directory (not installed)
SHIPPED = ROOT / "fastllm" / "data" / "pydoc-llama"  # its export, installed as package data


def refresh(progress=lambda line: print(line, file=sys.stderr)) -> Path:
    """Export BUNDLED (verified against PyTorch) over the shipped copy; the old copy stays until the new one is
    complete."""
    from fastllm.export import export_model

    export_model(BUNDLED, SHIPPED, overwrite=True, progress=lambda line: progress(f"[export] {line}"))
    return SHIPPED


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m fastllm.train.bundled", description=__doc__.splitlines()[0]
                            ).parse_args(argv)
    refresh()
    return 0


if __name__ == "__main__":
    sys.exit(main())

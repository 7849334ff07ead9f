#!/usr/bin/env bash
# Set up .venv with fastllm (editable), the export tools and the test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: on this machine `torch==2.13.0` resolves to the CPU wheel; an unpinned `torch`
# would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[export,bench,serve,ray,dev]"
.venv/bin/python -c "import fastllm, torch, onnxruntime; print('fastllm', fastllm.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"

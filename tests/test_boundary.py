"""The runtime never imports torch, export/ or kernels/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "fastllm"  # the runtime's own folder: not export/, bench/, ...
ALLOWED = {"numpy", "onnxruntime", "tokenizers", "jinja2", "fastllm"}
OUTSIDE = [["fastllm", name] for name in ("export", "kernels", "bench", "train")]


def test_import_fastllm_leaves_torch_unimported():
    code = ("import sys, fastllm, fastllm.cli\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx') "
            "or m.split('.')[:2] in (['fastllm', 'export'], ['fastllm', 'kernels'], ['fastllm', 'bench'], "
            "['fastllm', 'train']))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_runtime_sources_import_only_the_allowed_packages():
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(path.name, a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add((path.name, node.module))
    bad = sorted((f, m) for f, m in found if m.split(".")[0] not in ALLOWED | stdlib | {"__future__"})
    assert bad == []
    # installed, export/ kernels/ bench/ train/ live under the fastllm name too: the runtime still never imports them
    assert sorted((f, m) for f, m in found if m.split(".")[:2] in OUTSIDE) == []

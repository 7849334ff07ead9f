"""The structure of the code and of what the exporter writes: imports go one way (no cycles; the runtime imports
none of the other folders; export and kernels never import train), precisions are defined once, and every weight
MatMul has a readable, unique node name in both graph kinds, kept through quantization."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import onnx

from fastllm.export.precision import PRECISIONS, QuantOptions
from fastllm.export.quantized_graph import matmul_labels, quantize_graph

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> its installed name (pyproject.toml's package-dir)
PACKAGES = {"fastllm": "fastllm", "export": "fastllm.export", "kernels": "fastllm.kernels", "bench": "fastllm.bench",
            "train": "fastllm.train", "serve": "fastllm.serve"}
# The one cycle allowed: the architecture registry imports its built-in adapters (export/architectures/*) so that
# they register themselves, and each adapter imports the registry to register.
REGISTRY, ADAPTERS = "fastllm.export.registry", "fastllm.export.architectures"
WEIGHT_MATMUL = re.compile(r"^/model/layers\.\d+/(attn|mlp)/\w+/MatMul$|^/lm_head/MatMul$")
LABEL = re.compile(r"^(layers\.\d+\.(attn|mlp)\.\w+|lm_head) \d+x\d+$")


def weight_matmul_names(directory) -> list[str]:
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_every_weight_matmul_is_named_after_its_module(exported, variant):
    manifest, path = exported[variant]
    names = weight_matmul_names(path)
    per_layer = {"fused": 4, "portable": 6 if manifest.architecture == "GPT2LMHeadModel" else 7}[variant[1]]
    assert len(names) == per_layer * manifest.num_layers + 1
    assert [n for n in names if not WEIGHT_MATMUL.match(n)] == []
    assert len(set(names)) == len(names) and "/lm_head/MatMul" in names
    labels = matmul_labels(onnx.load(str(path / "model.onnx"), load_external_data=False))
    assert [label for label in labels.values() if not LABEL.match(label)] == []
    if variant[1] == "fused":
        assert {"layers.0.attn.qkv_proj", "layers.0.attn.o_proj", "layers.0.mlp.down_proj"} <= {
            label.split()[0] for label in labels.values()}


def test_quantized_matmuls_keep_their_names(exported, variant, tmp_path):
    _, path = exported[variant]
    names = weight_matmul_names(path)
    quantize_graph(path, tmp_path, QuantOptions("int4"))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert sorted(n.name for n in graph.node if n.op_type == "MatMulNBits") == sorted(f"{n}_Q4" for n in names)


def test_the_runtime_knows_every_precision_the_exporter_writes():
    from fastllm.manifest import PRECISIONS as KNOWN

    assert tuple(PRECISIONS) == KNOWN


# -- imports ------------------------------------------------------------------------------------------------------
def modules() -> dict[str, tuple[str, Path]]:
    """Installed module name -> (top-level folder, file), for every module of the five folders."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))] = (folder, path)
    return found


def imported(name: str, path: Path, known) -> set[str]:
    """The project's modules that `name` imports, at module level or inside functions: `from fastllm.export import
    pipeline` is the module pipeline, `from fastllm.export import export_model` the package fastllm.export."""
    targets = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in known:  # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, (_, path) in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_but_the_architecture_registry():
    graph = import_graph()
    assert ADAPTERS in graph[REGISTRY], "the registry no longer imports its adapters: drop the exception"
    graph[REGISTRY] = {m for m in graph[REGISTRY] if m != ADAPTERS and not m.startswith(ADAPTERS + ".")}
    assert cycles(graph) == []


def test_imports_go_one_way():
    graph, folders = import_graph(), {name: folder for name, (folder, _) in modules().items()}
    runtime = sorted((m, t) for m, targets in graph.items() if folders[m] == "fastllm"
                     for t in targets if folders[t] != "fastllm")
    assert runtime == [], "the runtime (fastllm/) imports only itself"
    train = sorted((m, t) for m, targets in graph.items() if folders[m] in ("export", "kernels")
                   for t in targets if folders[t] == "train")
    assert train == [], "export/ and kernels/ never import train/"


def test_import_fastllm_leaves_the_server_unimported():
    """The server's extras (Starlette, uvicorn, prometheus-client; ray for --replicas) load only when `fastllm serve`
    runs: not on `import fastllm`, nor when the command line registers the `serve` subcommand."""
    import subprocess
    import sys

    code = ("import sys, fastllm, fastllm.cli\n"
            "fastllm.cli.parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client', "
            "'openai', 'ray') or m in ('fastllm.serve.app', 'fastllm.serve.protocol', 'fastllm.serve.metrics', "
            "'fastllm.serve.ray_app', 'fastllm.serve.ray_router')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    graph = import_graph()
    assert [m for m, targets in graph.items() if m.split(".")[1:2] != ["serve"]
            and any(t.startswith("fastllm.serve") for t in targets)] == [], "only fastllm.serve imports the server"

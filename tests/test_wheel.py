"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment
with the runtime dependencies only (at the oldest versions pyproject.toml admits), used from outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = Path(__file__).with_name("floors.txt")


def run(*command, cwd, timeout=600, env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | (env or {})
    out = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, env=env, check=False,
                         timeout=timeout)
    assert out.returncode == 0, f"{command} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def build_wheel(tmp_path_factory, **env) -> Path:
    """Built from a copy of the sources (a build in the checkout would reuse a stale build/ folder or the editable
    install's compiled kernels); env: variables for the build (CC=false: a machine without a C compiler)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("fastllm", "export", "kernels", "bench", "train", "serve"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results", "*.so"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source, cwd=dist, env=env)
    (path,) = dist.glob("fastllm-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel with its CPU runtime dependencies, pinned to the floors."""
    env = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(env)
    run(env / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", FLOORS,
        f"{wheel}[cpu]", cwd=env)
    return env


def test_the_wheel_holds_only_the_fastllm_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastllm"}
    for package in ("export", "kernels", "bench", "train"):  # the checkout's folders, under the one name
        assert f"fastllm/{package}/__init__.py" in names
    assert {"fastllm/data/pydoc-llama/model.onnx", "fastllm/data/pydoc-llama/fastllm.json"} <= set(names)
    assert not any("/results/" in n or n.endswith(".safetensors") for n in names)  # no bench results, no HF copy


def test_extras_choose_exactly_one_onnxruntime(wheel):
    """onnxruntime and onnxruntime-gpu both install the `onnxruntime` module over each other: no install path may
    ask for both."""
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: ([\w.-]+)[^;\n]*(?:; extra == \"(\w+)\")?$", metadata, re.MULTILINE)
    by_extra: dict[str, set[str]] = {}
    for name, extra in requires:
        by_extra.setdefault(extra, set()).add(name.lower())
    assert not {n for n in by_extra[""] if n.startswith("onnxruntime")}  # the base install picks none
    assert by_extra["cpu"] == {"onnxruntime"} and by_extra["gpu"] == {"onnxruntime-gpu"}
    assert not {n for n in by_extra["export"] if n.startswith("onnxruntime-gpu")}


def test_installed_wheel_generates_with_the_bundled_model(installed, tmp_path):
    python = installed / "bin" / "python"
    packages = run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path).stdout.lower()
    assert "torch" not in packages and "transformers" not in packages and "onnx==" not in packages
    out = run(installed / "bin" / "fastllm", "generate", "The list type", "--max-new-tokens", "12",
              "--temperature", "0", "--no-stream", cwd=tmp_path)
    assert out.stdout.strip(), out.stderr
    # the same tokens as this checkout's runtime gives on the same shipped model
    import fastllm
    from fastllm.cli import BUNDLED_MODEL

    expected = fastllm.load(BUNDLED_MODEL).generate("The list type", fastllm.SamplingParams(max_new_tokens=12))
    assert out.stdout.strip() == expected.text.strip()


def test_the_installed_wheel_samples_on_its_c_kernels(wheel, installed, tmp_path):
    assert any(re.fullmatch(r"fastllm/_sampling\.[\w.-]+\.so", n) for n in zipfile.ZipFile(wheel).namelist())
    code = "from fastllm import native; print(native.description())"
    assert run(installed / "bin" / "python", "-c", code, cwd=tmp_path).stdout.startswith("C kernels")


def test_without_a_c_compiler_the_wheel_builds_without_the_kernels(tmp_path_factory):
    """The extension is optional: where it cannot compile, the package still builds (the sampler then runs its
    numpy + ONNX Runtime passes, tested in tests/test_sampler.py as the "numpy" backend)."""
    names = zipfile.ZipFile(build_wheel(tmp_path_factory, CC="false")).namelist()
    assert "fastllm/sampler.py" in names and not any(n.endswith(".so") for n in names)


def test_installed_top_level_packages_are_only_fastllm(installed, tmp_path):
    (site,) = (installed / "lib").glob("python*/site-packages")
    (dist_info,) = site.glob("fastllm-*.dist-info")
    record = (dist_info / "RECORD").read_text().splitlines()
    top = {line.split(",")[0].split("/")[0] for line in record}
    top = {t for t in top if not t.endswith(".dist-info") and not t.startswith("..")}  # ../../bin/fastllm
    assert top == {"fastllm"}
    code = ("import importlib.util as u, sys, fastllm; "
            "print([m for m in ('export', 'kernels', 'bench', 'train') if u.find_spec(m)], 'torch' in sys.modules)")
    assert run(installed / "bin" / "python", "-c", code, cwd=tmp_path).stdout.split() == ["[]", "False"]


def test_without_an_onnxruntime_extra_the_error_says_what_to_install(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    run(env / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", FLOORS, wheel,
        cwd=tmp_path)
    out = subprocess.run([env / "bin" / "python", "-c", "import fastllm"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 1
    assert "ImportError: fastllm needs ONNX Runtime and none is installed: pip install 'fastllm[cpu]'" in out.stderr

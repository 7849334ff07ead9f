"""Tiny models of every supported architecture, built and exported once per test session (seconds each)."""

from __future__ import annotations

import pytest

from fastllm import native, sampler
from fastllm.export.tiny import TINY_ARCHITECTURES, build_tiny, train_tokenizer

# The sampler runs on its C kernels where they are built and on numpy + ONNX Runtime where they are not: the tests of
# these modules that drive a Sampler directly run both ways (those through an engine run what the engine loaded).
BOTH_SAMPLER_BACKENDS = {"test_sampler"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rpartition(".")[2] in BOTH_SAMPLER_BACKENDS and \
            "engines" not in metafunc.fixturenames:
        metafunc.parametrize("sampler_backend", ["c", "numpy"], indirect=True)


@pytest.fixture
def sampler_backend(request, monkeypatch):
    """The sampler's backend for Samplers made in this test: "c" (the default) or "numpy"."""
    backend = getattr(request, "param", "c")
    if backend == "c":
        assert native.lib is not None, "the C sampling kernels are not built: scripts/setup.sh (pip) builds them"
    else:
        monkeypatch.setattr(sampler, "native_lib", None)
    sampler._local.__dict__.pop("samplers", None)  # the module functions' cached Samplers: made anew
    yield backend
    sampler._local.__dict__.pop("samplers", None)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    return {arch: build_tiny(arch, root / arch, tokenizer=tokenizer) for arch in TINY_ARCHITECTURES}


GRAPHS = ("fused", "portable")
VARIANTS = [(arch, graph) for arch in TINY_ARCHITECTURES for graph in GRAPHS]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, hf_dirs):
    """{(architecture, graph kind): (manifest, model directory)}; a bare architecture name means the fused graph."""
    from fastllm.export import export_model

    root = tmp_path_factory.mktemp("fastllm")
    out = {}
    for arch, graph in VARIANTS:
        path = root / f"{arch}-{graph}"
        out[arch, graph] = (export_model(hf_dirs[arch], path, graph=graph), path)
        if graph == "fused":
            out[arch] = out[arch, graph]
    return out


@pytest.fixture(scope="session")
def engines(exported):
    import fastllm

    loaded = {key: fastllm.load(path, threads=1) for key, (_, path) in exported.items() if isinstance(key, tuple)}
    return {**loaded, **{arch: loaded[arch, "fused"] for arch in TINY_ARCHITECTURES}}


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
            for arch, path in hf_dirs.items()}


@pytest.fixture(scope="session")
def bundled_dir():
    """The project's trained model as it ships, exported, inside the package (kept in step with the exporter by
    tests/test_bundled.py). Read only."""
    from fastllm.cli import BUNDLED_MODEL

    return BUNDLED_MODEL


@pytest.fixture
def renamed_source(hf_dirs, tmp_path):
    """A copy of the tiny GPT-2 directory whose config.json claims another architecture."""
    import json
    import shutil

    def make(architecture: str):
        src = tmp_path / "src"
        shutil.copytree(hf_dirs["GPT2LMHeadModel"], src)
        config = json.loads((src / "config.json").read_text())
        config["architectures"] = [architecture]
        (src / "config.json").write_text(json.dumps(config))
        return src

    return make


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def variant(request):
    """(architecture, graph kind): every architecture in both graph kinds."""
    return request.param

"""Tiny models of every supported architecture, built and exported once per test session (seconds each)."""

from __future__ import annotations

import pytest

from export.tiny import TINY_ARCHITECTURES, build_tiny, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    return {arch: build_tiny(arch, root / arch, tokenizer=tokenizer) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, hf_dirs):
    from export import export_model

    root = tmp_path_factory.mktemp("fastllm")
    return {arch: (export_model(src, root / arch), root / arch) for arch, src in hf_dirs.items()}


@pytest.fixture(scope="session")
def engines(exported):
    import fastllm

    return {arch: fastllm.load(path, threads=1) for arch, (_, path) in exported.items()}


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
            for arch, path in hf_dirs.items()}


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch(request):
    return request.param

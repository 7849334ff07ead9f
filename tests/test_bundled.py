"""The model the project trains and ships: it loads in transformers, exports like any user's model, keeps its
perplexity through export, and is what `fastllm generate "prompt"` uses when no model directory is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fastllm.train.bundled import BUNDLED
from fastllm.train.corpus import held_out_text
from fastllm.train.evaluate import torch_perplexity

import fastllm
from fastllm.perplexity import perplexity


def test_shipped_directory_is_a_standard_hugging_face_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 25 * 2**20
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(BUNDLED).decode([0]) == "<|endoftext|>"
    record = json.loads((BUNDLED / "training.json").read_text())
    assert record["command"].startswith("python -m train.train") and record["train_seconds"] <= 20 * 60
    assert 5e6 <= record["parameters"] <= 20e6 and record["val_ppl"] > 1


def test_export_keeps_the_perplexity(bundled_dir):
    from transformers import AutoModelForCausalLM

    manifest = fastllm.Manifest.read(bundled_dir)
    assert manifest.verification["passed"] and manifest.graph.kind == "fused"
    engine = fastllm.load(bundled_dir)
    ids = engine.encode(held_out_text())[:4097]
    ours = perplexity(engine, ids, window=256)
    theirs = torch_perplexity(AutoModelForCausalLM.from_pretrained(BUNDLED).eval(), np.array(ids), window=256)
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-3)
    assert ours.ppl < 1000  # it learned something: a uniform guess would be 4096


def test_generate_without_a_model_directory_uses_the_bundled_model(bundled_dir):
    env = {**os.environ, "FASTLLM_CACHE": str(bundled_dir.parents[1])}
    out = subprocess.run([sys.executable, "-m", "fastllm.cli", "generate", "A decorator is", "--max-new-tokens", "8",
                          "--no-stream"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = fastllm.load(bundled_dir).generate("A decorator is", fastllm.SamplingParams(max_new_tokens=8))
    assert out.stdout.strip() == expected.text.strip() and "exporting" not in out.stderr  # reused from the cache


def test_exports_by_an_older_exporter_are_replaced(bundled_dir):
    """The cache key covers the weights and the exporter's code; stale exports are removed, the current one kept."""
    from fastllm.train.bundled import default_model, fingerprint

    assert bundled_dir.name == f"pydoc-llama-{fingerprint(BUNDLED)}"
    stale = bundled_dir.parent / "pydoc-llama-000000000000"
    stale.mkdir()
    (stale / "fastllm.json").write_text("{}")
    assert default_model(progress=lambda line: None) == bundled_dir
    assert not stale.exists() and (bundled_dir / "fastllm.json").is_file()

"""The model the project trains and ships: it loads in transformers, exports like any user's model, keeps its
perplexity through export, and is what `fastllm generate "prompt"` uses when no model directory is given."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import fastllm
from fastllm.export.corpus import held_out_text
from fastllm.perplexity import perplexity
from fastllm.train.bundled import BUNDLED
from fastllm.train.evaluate import torch_perplexity


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


@pytest.fixture(scope="module")
def fresh_export(tmp_path_factory):
    """The trained model exported by this checkout's exporter."""
    from fastllm.export import export_model

    out = tmp_path_factory.mktemp("fresh") / "pydoc-llama"
    export_model(BUNDLED, out)
    return out


def test_export_keeps_the_perplexity(fresh_export):
    from transformers import AutoModelForCausalLM

    manifest = fastllm.Manifest.read(fresh_export)
    assert manifest.verification["passed"] and manifest.graph.kind == "fused"
    engine = fastllm.load(fresh_export)
    ids = engine.encode(held_out_text())[:4097]
    ours = perplexity(engine, ids, window=256)
    theirs = torch_perplexity(AutoModelForCausalLM.from_pretrained(BUNDLED).eval(), np.array(ids), window=256)
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-3)
    assert ours.ppl < 1000  # it learned something: a uniform guess would be 4096


def test_the_shipped_export_is_in_step_with_the_exporter(bundled_dir, fresh_export):
    """The copy inside the package must be what the exporter writes today: same manifest contract and graph
    interface, the same logits (fp32 tolerance) and greedy tokens. If this fails after a change to the exporter,
    run `python -m fastllm.train.bundled` and commit fastllm/data/pydoc-llama."""
    shipped, fresh = fastllm.Manifest.read(bundled_dir), fastllm.Manifest.read(fresh_export)
    assert shipped.format_version == fresh.format_version == fastllm.FORMAT_VERSION
    for field in ("architecture", "num_layers", "hidden_size", "vocab_size", "max_context", "precision", "graph",
                  "eos_token_ids", "bos_token_id", "pad_token_id", "rope", "tokenizer", "generation"):
        assert getattr(shipped, field) == getattr(fresh, field), field
    a, b = fastllm.load(bundled_dir, threads=1), fastllm.load(fresh_export, threads=1)
    ids = a.encode(held_out_text())[:200]
    from fastllm.export.quality import prompt_logits

    la, lb = prompt_logits(a, ids), prompt_logits(b, ids)
    assert np.abs(la - lb).max() <= 1e-4 * max(1.0, np.abs(lb).max())
    params = fastllm.SamplingParams(max_new_tokens=32, ignore_eos=True)
    prompts = ["The list type", "To open a file,", "A decorator is"]
    assert [c.token_ids for c in a.generate(prompts, params)] == [c.token_ids for c in b.generate(prompts, params)]
    assert (bundled_dir / "tokenizer.json").read_bytes() == (fresh_export / "tokenizer.json").read_bytes()


def test_generate_without_a_model_directory_uses_the_bundled_model(bundled_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastllm.cli", "generate", "A decorator is", "--max-new-tokens", "8",
                          "--temperature", "0", "--no-stream"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    expected = fastllm.load(bundled_dir).generate("A decorator is", fastllm.SamplingParams(max_new_tokens=8))
    assert out.stdout.strip() == expected.text.strip() and "export" not in out.stderr

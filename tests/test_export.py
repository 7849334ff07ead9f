"""Export: every architecture passes verification inside export; failures leave nothing behind."""

from __future__ import annotations

import json

import onnx
import pytest

import fastllm
from fastllm.export import export_model
from fastllm.export.registry import supported
from fastllm.export.tiny import TINY_ARCHITECTURES
from fastllm.manifest import FORMAT_VERSION, MANIFEST_NAME


def test_every_listed_architecture_is_registered():
    assert set(TINY_ARCHITECTURES) <= set(supported())


def test_verification_figures_are_recorded(exported, variant):
    manifest, path = exported[variant]
    v = manifest.verification
    assert v["passed"] and v["greedy_match"] and v["first_mismatch"] is None
    assert v["max_abs_diff"] <= v["tolerance"] == pytest.approx(1e-4 * max(1.0, v["max_abs_logit"]))
    assert v["new_tokens"] == 32 and v["decode_steps"] >= 8 and len(set(v["prompt_lengths"])) == 2
    on_disk = json.loads((path / MANIFEST_NAME).read_text())
    assert on_disk["format_version"] == FORMAT_VERSION and on_disk["verification"] == json.loads(json.dumps(v))


def test_model_directory_layout(exported, variant):
    arch, kind = variant
    manifest, path = exported[variant]
    names = {p.name for p in path.iterdir()}
    assert {"model.onnx", "model.onnx.data", "fastllm.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == [t.name for t in manifest.graph.inputs]
    # the weights live in model.onnx.data, so models over 2 GB load the same way
    assert (path / "model.onnx").stat().st_size < (path / "model.onnx.data").stat().st_size
    assert manifest.architecture == arch and manifest.precision == "fp32" and manifest.graph.kind == kind
    assert manifest.eos_token_ids == (0,) and manifest.pad_token_id == 1


def test_failed_verification_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    # Break the adapter for real (drop Mistral's sliding window): the traced graph is then wrong for long
    # sequences and verification must stop the export.
    from fastllm.export.architectures import llama

    monkeypatch.setattr(llama, "sliding_windows", lambda *a: ())
    out = tmp_path / "out"
    with pytest.raises(fastllm.VerificationError, match=r"verification failed at decode \d+: max \|Δlogits\|"):
        export_model(hf_dirs["MistralForCausalLM"], out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_names_the_supported_ones(renamed_source, tmp_path):
    src = renamed_source("FalconForCausalLM")
    with pytest.raises(fastllm.UnsupportedArchitectureError, match="'FalconForCausalLM' is not supported.*"
                                                                   "LlamaForCausalLM.*Phi3ForCausalLM"):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_and_occupied_destination(hf_dirs, tmp_path):
    with pytest.raises(fastllm.ModelLoadError, match="is not a directory"):
        export_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(fastllm.ExportError, match="not empty.*--overwrite"):
        export_model(hf_dirs["GPT2LMHeadModel"], tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_export(hf_dirs, tmp_path):
    out = tmp_path / "out"
    export_model(hf_dirs["GPT2LMHeadModel"], out, max_context=64)
    manifest = export_model(hf_dirs["GPT2LMHeadModel"], out, overwrite=True, max_context=128)
    assert manifest.max_context == 128 == fastllm.load(out).manifest.max_context
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_in_memory_model(hf_models, tokenizer, tmp_path):
    from fastllm.export import export_pretrained

    manifest = export_pretrained(hf_models["Qwen2ForCausalLM"], tmp_path / "m", tokenizer=tokenizer)
    assert manifest.verification["passed"]
    engine = fastllm.load(tmp_path / "m")
    assert engine.generate("hello", fastllm.SamplingParams(max_new_tokens=4)).completion_tokens >= 1


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_llama_rope_scaling_variants(tokenizer, tmp_path, rope):
    import torch
    import transformers as tf

    from fastllm.export import export_pretrained
    from fastllm.export.tiny import tiny_config

    config = tiny_config("LlamaForCausalLM", tokenizer.get_vocab_size())
    config.rope_parameters = rope
    torch.manual_seed(0)
    manifest = export_pretrained(tf.LlamaForCausalLM(config), tmp_path / "m", tokenizer=tokenizer)
    assert manifest.verification["passed"] and manifest.rope["rope_type"] == rope["rope_type"]


def test_sequence_length_dependent_rope_is_refused(tokenizer, tmp_path):
    import transformers as tf

    from fastllm.export import export_pretrained
    from fastllm.export.tiny import tiny_config

    config = tiny_config("LlamaForCausalLM", tokenizer.get_vocab_size())
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(fastllm.UnsupportedArchitectureError, match="rope_type 'dynamic'.*not supported"):
        export_pretrained(tf.LlamaForCausalLM(config), tmp_path / "m", tokenizer=tokenizer)
    assert not (tmp_path / "m").exists()


def test_fused_graph_structure(exported, arch):
    """GroupQueryAttention in every layer writing the cache in place: nothing else touches the KV tensors."""
    manifest, path = exported[arch, "fused"]
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == manifest.num_layers
    kv_names = set()
    for layer in range(manifest.num_layers):
        kv_names |= {*manifest.past_names(layer), *manifest.present_names(layer)}
    for node in graph.node:
        touches = kv_names & {*node.input, *node.output}
        assert not touches or node.op_type == "GroupQueryAttention", (node.op_type, touches)
    for node, layer in zip(gqa, range(manifest.num_layers)):
        assert list(node.input[3:5]) == list(manifest.past_names(layer))
        assert list(node.output[1:3]) == list(manifest.present_names(layer))
    assert not [n for n in graph.node if n.op_type == "Concat" and kv_names & set(n.input)]
    fused_ops = {n.op_type for n in graph.node}
    assert {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"} & fused_ops
    shapes = {t.name: t.shape for t in manifest.graph.inputs}
    assert shapes["past_key_values.0.key"] == ("batch", manifest.num_kv_heads, "capacity", manifest.head_dim)


def test_portable_graph_uses_only_standard_ops(exported, arch):
    _, path = exported[arch, "portable"]
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}


def test_tied_embedding_is_stored_once(exported, variant):
    arch, _ = variant
    manifest, path = exported[variant]
    if arch not in ("Qwen2ForCausalLM", "GPT2LMHeadModel"):  # the tiny configs with tied embeddings
        pytest.skip("untied embeddings")
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    vocab_by_hidden = [t.name for t in graph.initializer
                       if sorted(t.dims) == sorted([manifest.vocab_size, manifest.hidden_size])]
    assert len(vocab_by_hidden) == 1


@pytest.mark.parametrize("arch, graph", [("LlamaForCausalLM", "fused"), ("GPT2LMHeadModel", "portable")])
def test_fp16_export_is_verified_with_its_tolerance(hf_dirs, tmp_path, arch, graph):
    """fp16 is for CUDA; ONNX Runtime's CPU kernels run it too, so export verifies it here."""
    manifest = export_model(hf_dirs[arch], tmp_path / "m", graph=graph, precision="fp16")
    v = manifest.verification
    assert manifest.precision == "fp16" and manifest.kv_dtype == "float16" and manifest.graph.optimized is None
    assert v["rtol"] == 1e-2 and v["max_abs_diff"] <= v["tolerance"] and v["greedy_match"]
    assert [t.dtype for t in manifest.graph.outputs if t.name == "logits"] == ["float32"]
    with pytest.warns(RuntimeWarning, match="fp16, which is meant for CUDA"):
        engine = fastllm.load(tmp_path / "m")
    assert engine.generate("Return", fastllm.SamplingParams(max_new_tokens=4)).completion_tokens >= 1

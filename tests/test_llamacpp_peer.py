"""The llama.cpp peer of `fastllm bench`: the HF -> GGUF converter gives llama.cpp the same function as PyTorch,
and its adapter runs greedy and sampled. Runs where llama-cpp-python and gguf are installed (an optional peer: it
compiles llama.cpp, so CI's required path does not install it); the resolve/skip logic runs everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm.bench.engines import resolve


def _hf(tmp_path, architecture: str):
    import torch
    import transformers as tf

    config_class = {"LlamaForCausalLM": tf.LlamaConfig, "Qwen2ForCausalLM": tf.Qwen2Config}[architecture]
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          initializer_range=0.2, tie_word_embeddings=architecture == "Qwen2ForCausalLM",
                          bos_token_id=0, eos_token_id=0)
    config.architectures = [architecture]
    torch.manual_seed(0)
    model = getattr(tf, architecture)(config).eval()
    for layer in model.model.layers:  # Qwen2's q/k/v biases are zero at init: make them count
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if proj.bias is not None:
                torch.nn.init.normal_(proj.bias, std=0.5)
    out = tmp_path / architecture
    model.save_pretrained(out)
    return model, out


def test_resolve_gives_one_file_type_per_precision_and_a_reason_when_missing(tmp_path, monkeypatch):
    from fastllm.bench import engines

    monkeypatch.setattr(engines, "_installed", lambda module: False)
    specs = resolve(("llamacpp",), hf_dir=tmp_path, fastllm_dirs=[], peer_root=tmp_path,
                    precisions=("fp32", "int8", "int8-dynamic", "int4"))
    assert [s.precision for s in specs] == ["f32", "q8_0", "q4_0"]
    assert all(s.max_batch == 1 for s in specs)
    assert all("llama-cpp-python and gguf not installed" in s.skipped for s in specs)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_gguf_gives_llama_cpp_the_pytorch_function(tmp_path, architecture):
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from fastllm.bench.gguf_export import write_gguf

    model, hf_dir = _hf(tmp_path, architecture)
    path = write_gguf(hf_dir, tmp_path / "model-f32.gguf", max_context=256)
    assert not list(tmp_path.glob("*.partial"))
    ids = np.random.default_rng(1).integers(2, 512, size=48)
    with torch.no_grad():
        reference = model(torch.tensor(ids[None])).logits[0].numpy()
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, flash_attn=True, n_threads=1, verbose=False)
    llm.eval(ids.tolist())
    got = np.asarray(llm.scores[:len(ids)])
    # llama.cpp keeps its KV cache in fp16: differences of ~1e-2 on logits of ~6; a wrong rope layout gives ~1
    assert np.abs(got - reference).max() < 0.1
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_runner_greedy_equals_pytorch_and_quantized_files_run(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    import torch

    from fastllm.bench.engines import EngineSpec, LlamaCppRunner, prepare
    from fastllm.bench.workload import SAMPLINGS

    model, hf_dir = _hf(tmp_path, "LlamaForCausalLM")
    ids = np.random.default_rng(2).integers(2, 512, size=(1, 24))
    with torch.no_grad():
        expected = model.generate(torch.tensor(ids), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  pad_token_id=1)[0, ids.shape[1]:].tolist()
    lines = []
    for file_type in ("f32", "q8_0", "q4_0"):
        spec = EngineSpec("llamacpp", "llamacpp", f"llama.cpp {file_type}", file_type,
                          str(tmp_path / "peer" / f"model-{file_type}.gguf"), max_batch=1)
        prepare(spec, hf_dir, lines.append, max_context=256)
        runner = LlamaCppRunner(spec, threads=1)
        greedy = runner.generate(ids, 12, SAMPLINGS["greedy"], seed=0)
        assert len(greedy.stamps) == 12 and all(b >= a for a, b in zip(greedy.stamps, greedy.stamps[1:]))
        if file_type == "f32":
            assert greedy.first_row == expected
        again = runner.generate(ids, 12, SAMPLINGS["greedy"], seed=0)  # the cache is cleared between runs
        assert again.first_row == greedy.first_row
        sampled = [runner.generate(ids, 12, SAMPLINGS["sampled"], seed=s).first_row for s in (0, 0, 1)]
        assert sampled[0] == sampled[1] and all(0 <= t < 512 for t in sampled[2])
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "peer").glob("*.gguf")}
    assert sizes["model-q4_0.gguf"] < sizes["model-q8_0.gguf"] < sizes["model-f32.gguf"]
    assert sum("converting" in line for line in lines) == 1  # the fp32 file is made once and re-used


def test_converter_refuses_what_it_cannot_convert(tmp_path):
    pytest.importorskip("gguf")
    from fastllm.bench.errors import BenchError
    from fastllm.bench.gguf_export import write_gguf
    from fastllm.export.tiny import build_tiny

    hf_dir = build_tiny("LlamaForCausalLM", tmp_path / "llama3-rope")  # llama3 rope scaling
    with pytest.raises(BenchError, match="unscaled rope"):
        write_gguf(hf_dir, tmp_path / "out.gguf", max_context=256)
    gpt2 = build_tiny("GPT2LMHeadModel", tmp_path / "gpt2")
    with pytest.raises(BenchError, match="converts"):
        write_gguf(gpt2, tmp_path / "out.gguf", max_context=256)
    assert not (tmp_path / "out.gguf").exists()


def test_bench_puts_fastllm_beside_llama_cpp_at_the_same_bits(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    import json

    from fastllm.cli import main

    out = tmp_path / "out"
    code = main(["bench", "--shape", "tiny", "--engines", "fastllm,llamacpp", "--graphs", "fused", "--precisions",
                 "int4", "--prompt-lengths", "8", "--new-tokens", "4", "--batch-sizes", "1,2", "--threads", "1",
                 "--runs", "1", "--warmup", "0", "--sampling", "greedy", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["shapes"][0]["results"]
    peer = [r for r in rows if r["engine"] == "llamacpp"]
    assert [(r["label"], r["batch"]) for r in peer] == [("llama.cpp q4_0 flash-attn", 1)]
    assert "error" not in peer[0] and len(peer[0]["tokens"]) == 4
    assert any("batch sizes [2] left out" in n for n in results["notes"])
    text = (out / "results.md").read_text()
    assert "fastllm ÷ llama.cpp at the same bits per weight" in text
    line = next(x for x in text.splitlines() if x.startswith("| fastllm fused int4 | llama.cpp q4_0"))
    assert float(line.split("|")[-2]) > 0  # the TPOT ratio


def test_matrix_bits_count_the_matrices_of_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    from fastllm.bench.gguf_export import write_gguf
    from fastllm.bench.llamacpp_quality import matrix_bits

    _, hf = _hf(tmp_path, "LlamaForCausalLM")
    bits, size = matrix_bits(write_gguf(hf, tmp_path / "model-f32.gguf", max_context=256))
    assert bits == 32.0 and size == (tmp_path / "model-f32.gguf").stat().st_size


def test_llama_cpp_quality_on_the_bundled_model(tmp_path):
    """llama.cpp's f32 file scores the held-out text as fastllm's fp32 export does; its q8_0 loses a little."""
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from pathlib import Path

    from fastllm.bench import llamacpp_quality

    root = Path(__file__).resolve().parents[1]
    assert llamacpp_quality.main([str(root / "models" / "pydoc-llama"), str(root / "fastllm" / "data" / "pydoc-llama"),
                                  "--out", str(tmp_path / "out"), "--types", "f32,q8_0"]) == 0
    import json

    f32, q8 = json.loads((tmp_path / "out" / "llamacpp_quality.json").read_text())["rows"]
    assert f32["mean_kl"] < 1e-5 and abs(f32["relative_increase"]) < 1e-3 and f32["bits_per_weight"] == 32.0
    assert f32["mean_kl"] < q8["mean_kl"] < 1e-2 and q8["bits_per_weight"] == 8.5
    with pytest.raises(SystemExit):  # never over an earlier result
        llamacpp_quality.main([str(root / "models" / "pydoc-llama"), str(root / "fastllm" / "data" / "pydoc-llama"),
                               "--out", str(tmp_path / "out")])

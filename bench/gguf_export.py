"""Hugging Face directory -> GGUF file that llama.cpp loads, for the llama.cpp peer in `fastllm bench`.

Written with the `gguf` package from the directory's config.json and model.safetensors (numpy only, no torch):
the Llama and Qwen2 shapes, fp32 tensors (norms and biases stay fp32 at every precision). Quantized files are made
from it by llama.cpp's own quantizer (`llama_model_quantize`, what its `llama-quantize` tool runs), so the peer's
q8_0 / q4_0 are exactly what its users get: for a tied embedding, llama.cpp keeps the shared matrix at q6_K in a
q4_0 file (its rule for the output matrix), q8_0 in a q8_0 file.

Two layout facts a converter must get right:
- llama.cpp's "llama" architecture rotates adjacent pairs (x0, x1), Hugging Face's Llama rotates halves
  (x_i, x_{i + d/2}); the query and key rows are permuted per head so both compute the same attention. "qwen2"
  uses the half rotation in llama.cpp too, so its rows stay.
- GGUF writes dimensions innermost first; the `gguf` writer takes numpy's (out, in) order and reverses it.

The vocabulary is a stand-in of the model's size (256 byte tokens and numbered ones): the benchmark feeds token
ids, so no text is ever tokenized, but llama.cpp needs a vocabulary to load a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastllm.bench.errors import BenchError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# --precisions of fastllm -> the llama.cpp file type timed beside it (same bits per weight, near enough)
FILE_TYPES = {"fp32": "f32", "int8": "q8_0", "int8-dynamic": "q8_0", "int4": "q4_0"}


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from the half layout (all first halves, then all second halves) to adjacent pairs."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(hf_dir: Path) -> dict:
    config = json.loads((hf_dir / "config.json").read_text())
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise BenchError(f"the llama.cpp peer converts {sorted(ARCHITECTURES)} only; {hf_dir} is {architecture}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise BenchError(f"the llama.cpp peer converts unscaled rope only; {hf_dir} has rope_type "
                         f"{rope.get('rope_type')!r}")
    return config


def write_gguf(hf_dir: str | Path, out: str | Path, *, max_context: int) -> Path:
    """Write `out` (fp32 GGUF) from the Hugging Face directory; written to a temporary name, then renamed."""
    import gguf
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    config = _config(hf_dir)
    arch = ARCHITECTURES[config["architectures"][0]]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    if not weights:
        raise BenchError(f"{hf_dir} has no .safetensors weights to convert for llama.cpp")

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(hf_dir.parent.name)
    writer.add_context_length(max_context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, vocab, config)

    def put(name: str, hf_name: str, transform=None) -> None:
        w = np.ascontiguousarray(weights[hf_name], dtype=np.float32)
        writer.add_tensor(name, np.ascontiguousarray(transform(w)) if transform else w)

    q_fix = (lambda w: _permute_rope(w, heads)) if arch == "llama" else None
    k_fix = (lambda w: _permute_rope(w, kv_heads)) if arch == "llama" else None
    put("token_embd.weight", "model.embed_tokens.weight")
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight")
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", q_fix)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", k_fix)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        for proj, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            if p + f"self_attn.{proj}.bias" in weights:
                fix = {"q": q_fix, "k": k_fix}.get(short)
                put(b + f"attn_{short}.bias", p + f"self_attn.{proj}.bias",
                    (lambda w, fix=fix: fix(w[:, None])[:, 0]) if fix else None)
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight")
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight")
    put("output_norm.weight", "model.norm.weight")
    if not config.get("tie_word_embeddings", False):
        put("output.weight", "lm_head.weight")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _add_vocabulary(writer, vocab: int, config: dict) -> None:
    import gguf

    if vocab < 260:
        raise BenchError(f"the llama.cpp peer needs a vocabulary of at least 260 ids, this model has {vocab}")
    tokens = [f"<0x{b:02X}>" for b in range(256)] + [f"<t{i}>" for i in range(256, vocab)]
    types = [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 256)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = config.get(key)
        value = value[0] if isinstance(value, list) else value
        if isinstance(value, int) and 0 <= value < vocab:
            add(value)
    writer.add_add_bos_token(False)


def quantize_gguf(src: str | Path, out: str | Path, file_type: str, *, threads: int = 0) -> Path:
    """llama.cpp's quantizer: src (fp32 GGUF) -> out at `file_type` (q8_0, q4_0, ...); temporary name, then renamed."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}", None)
    if ftype is None:
        raise BenchError(f"llama.cpp has no file type {file_type!r}")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0:
            raise BenchError(f"llama.cpp's quantizer failed ({status}) on {src} -> {file_type}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


STAMP = ".converter"  # beside the GGUF files: the converter they were made by; other converters' files are remade


def _fingerprint() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def prepare_gguf(hf_dir: str | Path, out: str | Path, file_type: str, *, max_context: int, progress=print) -> Path:
    """`out` (model-<file_type>.gguf) made from hf_dir, re-used while this converter made it; fp32 first."""
    out = Path(out)
    stamp, fingerprint = out.parent / STAMP, _fingerprint()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file() or stamp.read_text() != fingerprint:
        for made in out.parent.glob("model-*.gguf"):  # ours: this folder is the benchmark's own
            made.unlink()
        stamp.write_text(fingerprint)
    f32 = out.with_name("model-f32.gguf")
    if not f32.is_file():
        progress(f"llama.cpp: converting {hf_dir} -> {f32}")
        write_gguf(hf_dir, f32, max_context=max_context)
    if not out.is_file():
        progress(f"llama.cpp: quantizing {f32.name} -> {out.name} (llama.cpp's quantizer)")
        quantize_gguf(f32, out, file_type)
    return out

"""Phi-3: Llama-like, with fused qkv_proj / gate_up_proj weights and optional partial rotary."""

from __future__ import annotations

from fastllm.export.architectures.llama import llama_like_spec
from fastllm.export.architectures.rope import rope_tables
from fastllm.export.registry import Adapted, register


@register("Phi3ForCausalLM")
def phi3(hf_model, max_context: int) -> Adapted:
    spec = llama_like_spec(hf_model, max_context, qkv_bias=False, o_bias=False, mlp_bias=False)
    src = hf_model.state_dict()
    q_size = spec.num_heads * spec.head_dim
    kv_size = spec.num_kv_heads * spec.head_dim
    out = {"embed_tokens.weight": src["model.embed_tokens.weight"], "norm.weight": src["model.norm.weight"]}
    out["lm_head.weight"] = src.get("lm_head.weight", src["model.embed_tokens.weight"])
    for i in range(spec.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        qkv = src[p + "self_attn.qkv_proj.weight"]  # (q_size + 2 * kv_size, hidden)
        out[q + "attn.q_proj.weight"] = qkv[:q_size]
        out[q + "attn.k_proj.weight"] = qkv[q_size : q_size + kv_size]
        out[q + "attn.v_proj.weight"] = qkv[q_size + kv_size :]
        out[q + "attn.o_proj.weight"] = src[p + "self_attn.o_proj.weight"]
        gate, up = src[p + "mlp.gate_up_proj.weight"].chunk(2, dim=0)  # first half is the gate
        out[q + "mlp.gate_proj.weight"] = gate
        out[q + "mlp.up_proj.weight"] = up
        out[q + "mlp.down_proj.weight"] = src[p + "mlp.down_proj.weight"]
        out[q + "input_norm.weight"] = src[p + "input_layernorm.weight"]
        out[q + "post_attention_norm.weight"] = src[p + "post_attention_layernorm.weight"]
    cos, sin = rope_tables(hf_model, hf_model.config, spec.rotary_dim, max_context)
    return Adapted(spec, out, cos, sin)

"""Llama-family decoders: Llama 2/3 (incl. rope scaling), SmolLM, TinyLlama, Mistral, Qwen2."""

from __future__ import annotations

from fastllm.export.architectures.rope import rope_tables
from fastllm.export.decoder import DecoderSpec
from fastllm.export.registry import Adapted, register, unsupported_setting


def sliding_windows(config, num_layers: int, max_context: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or window >= max_context:
        return ()
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if getattr(config, "use_sliding_window", True) is False:
        return ()
    return (window,) * num_layers


def llama_like_spec(hf_model, max_context: int, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> DecoderSpec:
    config = hf_model.config
    arch = type(hf_model).__name__
    if getattr(config, "hidden_act", "silu") != "silu":
        raise unsupported_setting(arch, f"hidden_act {config.hidden_act!r} (only 'silu')")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = getattr(config, "rope_parameters", None) or {}
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return DecoderSpec(
        architecture=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_context=max_context,
        norm="rms",
        norm_eps=config.rms_norm_eps,
        mlp="gated_silu",
        positions="rope",
        rotary_dim=rotary_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_windows=sliding_windows(config, config.num_hidden_layers, max_context),
    )


def llama_like_weights(hf_model, spec: DecoderSpec) -> dict:
    """HF Llama names -> DecoderLM names (same tensors, no copies)."""
    src = hf_model.state_dict()
    out = {"embed_tokens.weight": src["model.embed_tokens.weight"], "norm.weight": src["model.norm.weight"]}
    out["lm_head.weight"] = src["lm_head.weight"] if "lm_head.weight" in src else src["model.embed_tokens.weight"]
    renames = {
        "input_layernorm": "input_norm",
        "post_attention_layernorm": "post_attention_norm",
        "self_attn": "attn",
    }
    for key, tensor in src.items():
        if not key.startswith("model.layers."):
            continue
        name = key[len("model.") :]
        for old, new in renames.items():
            name = name.replace(f".{old}.", f".{new}.")
        out[name] = tensor
    return out


def adapt_llama_like(hf_model, max_context: int, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> Adapted:
    spec = llama_like_spec(hf_model, max_context, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias)
    cos, sin = rope_tables(hf_model, hf_model.config, spec.rotary_dim, max_context)
    return Adapted(spec, llama_like_weights(hf_model, spec), cos, sin)


@register("LlamaForCausalLM")
def llama(hf_model, max_context: int) -> Adapted:
    config = hf_model.config
    bias = bool(getattr(config, "attention_bias", False))
    return adapt_llama_like(
        hf_model, max_context, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
    )


@register("MistralForCausalLM")
def mistral(hf_model, max_context: int) -> Adapted:
    return adapt_llama_like(hf_model, max_context, qkv_bias=False, o_bias=False, mlp_bias=False)


@register("Qwen2ForCausalLM")
def qwen2(hf_model, max_context: int) -> Adapted:
    return adapt_llama_like(hf_model, max_context, qkv_bias=True, o_bias=False, mlp_bias=False)

"""GPT-2: LayerNorm, learned positions, tanh-GELU MLP, Conv1D weights stored (in, out)."""

from __future__ import annotations

from fastllm.export.decoder import DecoderSpec
from fastllm.export.registry import Adapted, register, unsupported_setting


@register("GPT2LMHeadModel")
def gpt2(hf_model, max_context: int) -> Adapted:
    config = hf_model.config
    arch = type(hf_model).__name__
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise unsupported_setting(arch, f"activation_function {config.activation_function!r}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise unsupported_setting(arch, f"{flag}=True")
    if not getattr(config, "scale_attn_weights", True):
        raise unsupported_setting(arch, "scale_attn_weights=False")
    d, heads = config.n_embd, config.n_head
    spec = DecoderSpec(
        architecture=arch,
        vocab_size=config.vocab_size,
        hidden_size=d,
        intermediate_size=config.n_inner or 4 * d,
        num_layers=config.n_layer,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        max_context=max_context,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        mlp="gelu_tanh",
        positions="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_bias=True,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
    )
    src = hf_model.state_dict()
    out = {
        "embed_tokens.weight": src["transformer.wte.weight"],
        "embed_positions.weight": src["transformer.wpe.weight"][:max_context],
        "norm.weight": src["transformer.ln_f.weight"],
        "norm.bias": src["transformer.ln_f.bias"],
        "lm_head.weight": src.get("lm_head.weight", src["transformer.wte.weight"]),
    }
    for i in range(spec.num_layers):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        # Conv1D keeps weights as (in, out); nn.Linear wants (out, in).
        wq, wk, wv = src[p + "attn.c_attn.weight"].t().chunk(3, dim=0)
        bq, bk, bv = src[p + "attn.c_attn.bias"].chunk(3, dim=0)
        out.update({
            q + "attn.q_proj.weight": wq, q + "attn.q_proj.bias": bq,
            q + "attn.k_proj.weight": wk, q + "attn.k_proj.bias": bk,
            q + "attn.v_proj.weight": wv, q + "attn.v_proj.bias": bv,
            q + "attn.o_proj.weight": src[p + "attn.c_proj.weight"].t(),
            q + "attn.o_proj.bias": src[p + "attn.c_proj.bias"],
            q + "mlp.up_proj.weight": src[p + "mlp.c_fc.weight"].t(),
            q + "mlp.up_proj.bias": src[p + "mlp.c_fc.bias"],
            q + "mlp.down_proj.weight": src[p + "mlp.c_proj.weight"].t(),
            q + "mlp.down_proj.bias": src[p + "mlp.c_proj.bias"],
            q + "input_norm.weight": src[p + "ln_1.weight"], q + "input_norm.bias": src[p + "ln_1.bias"],
            q + "post_attention_norm.weight": src[p + "ln_2.weight"],
            q + "post_attention_norm.bias": src[p + "ln_2.bias"],
        })
    return Adapted(spec, {k: v.contiguous() for k, v in out.items()})

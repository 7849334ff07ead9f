"""The fused graph: the same DecoderLM weights, wired through ONNX Runtime's fused kernels (kernels/).

Graph interface (rows right padded; the KV cache is one buffer per layer and kind, written in place):
    input_ids              (batch, seq)                       int64
    position_ids           (batch, seq)                       int64   (used by learned positions / outside rotary)
    seqlens_k              (batch,)                           int32   tokens in the cache after this step - 1
    total_sequence_length  ()                                 int32   max(seqlens_k) + 1
    logits_to_keep         ()                                 int64   positions ending at each row's last token
    past_key_values.{i}.key / .value   (batch, kv_heads, capacity, head_dim)   bound to the same buffers as
  -> logits                (batch, logits_to_keep, vocab)     present.{i}.key / .value (no Concat, no copy)

Per layer: one MatMul for q|k|v, read packed by GroupQueryAttention (rotary inside it when its kernel supports the
rotary width; otherwise q|k|v is split for rotary as plain ops),
the residual add fused into the next norm (SkipSimplifiedLayerNormalization / SkipLayerNormalization), one
MatMul for gate|up (SwiGLU) or MatMul + FastGelu (GPT-2).
"""

from __future__ import annotations

import torch
from fastllm.export.decoder import DecoderLM, DecoderSpec
from fastllm.kernels.fast_gelu import fast_gelu
from fastllm.kernels.group_query_attention import group_query_attention
from fastllm.kernels.rotary import apply_rotary
from fastllm.kernels.skip_norm import skip_norm
from torch import nn
from torch.nn import functional as F


def fused_supported(spec: DecoderSpec) -> str | None:
    """None when the fused graph applies, else why not."""
    if spec.head_dim % 8:
        return f"head_dim {spec.head_dim} is not a multiple of 8 (GroupQueryAttention)"
    return None


def rotary_in_attention(spec: DecoderSpec) -> bool:
    """GroupQueryAttention's own rotary needs head_dim % 16 == 0 and a cos table width that is a multiple of 8."""
    return spec.positions == "rope" and spec.head_dim % 16 == 0 and (spec.rotary_dim // 2) % 8 == 0


class FusedDecoderGraph(nn.Module):
    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model  # scope name "model": nodes read /model/layers.0/attn/...
        self.spec = model.spec
        self.inner_rotary = rotary_in_attention(model.spec)

    def attention(self, layer, x, seqlens_k, total, past_k, past_v, cos, sin, window):
        spec, attn = self.spec, layer.attn
        batch, seq, _ = x.shape
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # folded at export
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]) if spec.qkv_bias else None
        qkv = F.linear(x, weight, bias)
        tables = (self.model.cos_table, self.model.sin_table) if self.inner_rotary else (None, None)
        if spec.positions != "rope" or self.inner_rotary:  # q | k | v go into the attention op packed (no Split)
            out, present_k, present_v = group_query_attention(
                qkv, None, None, past_k, past_v, seqlens_k, total, *tables, num_heads=spec.num_heads,
                kv_heads=spec.num_kv_heads, local_window_size=window or -1)
            return attn.o_proj(out), present_k, present_v
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if spec.positions == "rope":  # rotary as plain ops, before the attention op
            q = apply_rotary(q.view(batch, seq, -1, spec.head_dim).transpose(1, 2), cos, sin)
            k = apply_rotary(k.view(batch, seq, -1, spec.head_dim).transpose(1, 2), cos, sin)
            q, k = q.transpose(1, 2).reshape(batch, seq, q_size), k.transpose(1, 2).reshape(batch, seq, kv_size)
        out, present_k, present_v = group_query_attention(
            q, k, v, past_k, past_v, seqlens_k, total, *tables, num_heads=spec.num_heads,
            kv_heads=spec.num_kv_heads, local_window_size=window or -1)
        return attn.o_proj(out), present_k, present_v

    def mlp(self, mlp, x):
        if self.spec.mlp == "gated_silu":
            weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # one MatMul for gate|up
            bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if self.spec.mlp_bias else None
            gate, up = F.linear(x, weight, bias).split(self.spec.intermediate_size, dim=-1)
            return mlp.down_proj(F.silu(gate) * up)
        return mlp.down_proj(fast_gelu(F.linear(x, mlp.up_proj.weight), mlp.up_proj.bias))

    def forward(self, input_ids, position_ids, seqlens_k, total_sequence_length, logits_to_keep, *past):
        model, spec = self.model, self.spec
        seq = input_ids.shape[1]
        x = model.embed_tokens(input_ids)  # (B, S, D)
        cos = sin = None
        if spec.positions == "learned":
            x = x + model.embed_positions(position_ids)
        elif not self.inner_rotary:
            cos = model.cos_table[position_ids].unsqueeze(1)  # (B, 1, S, rotary_dim // 2)
            sin = model.sin_table[position_ids].unsqueeze(1)
        windows = spec.sliding_windows or (None,) * spec.num_layers
        residual = x
        normed = model.layers[0].input_norm(x)
        presents = []
        for i, layer in enumerate(model.layers):
            attn_out, present_k, present_v = self.attention(layer, normed, seqlens_k, total_sequence_length,
                                                            past[2 * i], past[2 * i + 1], cos, sin, windows[i])
            presents += [present_k, present_v]
            normed, residual = skip_norm(layer.post_attention_norm, attn_out, residual)
            following = model.layers[i + 1].input_norm if i + 1 < spec.num_layers else model.norm
            normed, residual = skip_norm(following, self.mlp(layer.mlp, normed), residual)
        # each row's last real token sits at seqlens_k (prompt) or at 0 (one new token per row)
        lengths = seqlens_k.to(torch.int64)
        last = torch.minimum(lengths, torch.zeros_like(lengths) + (seq - 1))  # (B,), seq stays symbolic
        index = (last[:, None] - logits_to_keep + 1 + torch.arange(logits_to_keep)[None, :]).clamp(min=0)
        hidden = normed.gather(1, index[:, :, None].expand(-1, -1, spec.hidden_size))  # (B, keep, D)
        return (model.lm_head(hidden), *presents)

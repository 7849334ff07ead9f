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
from torch import nn
from torch.nn import functional as F

from fastllm.export.decoder import MLP, Attention, DecoderLM, DecoderSpec
from fastllm.kernels.fast_gelu import fast_gelu
from fastllm.kernels.group_query_attention import group_query_attention
from fastllm.kernels.rotary import apply_rotary
from fastllm.kernels.skip_norm import skip_norm


def fused_supported(spec: DecoderSpec) -> str | None:
    """None when the fused graph applies, else why not."""
    if spec.head_dim % 8:
        return f"head_dim {spec.head_dim} is not a multiple of 8 (GroupQueryAttention)"
    return None


def rotary_in_attention(spec: DecoderSpec) -> bool:
    """GroupQueryAttention's own rotary needs head_dim % 16 == 0 and a cos table width that is a multiple of 8."""
    return spec.positions == "rope" and spec.head_dim % 16 == 0 and (spec.rotary_dim // 2) % 8 == 0


class Projection(nn.Module):
    """One MatMul over the weights of Linear layers side by side (q|k|v, gate|up). A module of its own so that its
    node is named like one (/model/layers.3/attn/qkv_proj/MatMul); the weights stay the decoder's (a tuple, not
    registered twice). add_bias=False leaves the bias to the caller."""

    def __init__(self, *linears: nn.Linear, add_bias: bool = True):
        super().__init__()
        self.linears = linears
        self.add_bias = add_bias and linears[0].bias is not None

    def forward(self, x):
        weight = torch.cat([linear.weight for linear in self.linears])  # folded at export
        bias = torch.cat([linear.bias for linear in self.linears]) if self.add_bias else None
        return F.linear(x, weight, bias)


class FusedAttention(nn.Module):
    def __init__(self, attn: Attention, spec: DecoderSpec, window: int | None, tables: tuple):
        super().__init__()
        self.qkv_proj = Projection(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj
        self.spec, self.window = spec, window or -1
        self.tables = tables  # (cos, sin) for rotary inside the attention op, else (None, None)

    def forward(self, x, seqlens_k, total, past_k, past_v, cos, sin):
        spec = self.spec
        batch, seq, _ = x.shape
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        qkv = self.qkv_proj(x)  # (B, S, q_size + 2 * kv_size)
        if cos is None:  # q | k | v go into the attention op packed (no Split)
            q, k, v = qkv, None, None
        else:  # rotary as plain ops, before the attention op
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rotary(q.view(batch, seq, -1, spec.head_dim).transpose(1, 2), cos, sin)
            k = apply_rotary(k.view(batch, seq, -1, spec.head_dim).transpose(1, 2), cos, sin)
            q, k = q.transpose(1, 2).reshape(batch, seq, q_size), k.transpose(1, 2).reshape(batch, seq, kv_size)
        out, present_k, present_v = group_query_attention(
            q, k, v, past_k, past_v, seqlens_k, total, *self.tables, num_heads=spec.num_heads,
            kv_heads=spec.num_kv_heads, local_window_size=self.window)
        return self.o_proj(out), present_k, present_v


class FusedMLP(nn.Module):
    def __init__(self, mlp: MLP, spec: DecoderSpec):
        super().__init__()
        self.gated, self.intermediate_size = spec.mlp == "gated_silu", spec.intermediate_size
        if self.gated:
            self.gate_up_proj = Projection(mlp.gate_proj, mlp.up_proj)
        else:
            self.up_proj = Projection(mlp.up_proj, add_bias=False)
            self.up_bias = mlp.up_proj.bias  # added inside FastGelu
        self.down_proj = mlp.down_proj

    def forward(self, x):
        if self.gated:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(fast_gelu(self.up_proj(x), self.up_bias))


class FusedLayer(nn.Module):
    """A decoder layer whose residual adds are fused into the norms that follow: its own post-attention norm, then
    the next layer's input norm (the final norm after the last layer)."""

    def __init__(self, model: DecoderLM, i: int, tables: tuple):
        super().__init__()
        spec, layer = model.spec, model.layers[i]
        windows = spec.sliding_windows or (None,) * spec.num_layers
        self.attn = FusedAttention(layer.attn, spec, windows[i], tables)
        self.post_attention_norm = layer.post_attention_norm
        self.mlp = FusedMLP(layer.mlp, spec)
        self.next_norm = model.layers[i + 1].input_norm if i + 1 < spec.num_layers else model.norm

    def forward(self, normed, residual, seqlens_k, total, past_k, past_v, cos, sin):
        attn_out, present_k, present_v = self.attn(normed, seqlens_k, total, past_k, past_v, cos, sin)
        normed, residual = skip_norm(self.post_attention_norm, attn_out, residual)
        normed, residual = skip_norm(self.next_norm, self.mlp(normed), residual)
        return normed, residual, present_k, present_v


class FusedDecoder(nn.Module):
    """The decoder body of the fused graph -> (hidden states at the kept positions, *present caches); the LM head
    is applied by DecoderGraph."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.decoder = model
        self.spec = model.spec
        self.inner_rotary = rotary_in_attention(model.spec)
        tables = (model.cos_table, model.sin_table) if self.inner_rotary else (None, None)
        self.layers = nn.ModuleList(FusedLayer(model, i, tables) for i in range(model.spec.num_layers))

    def forward(self, input_ids, position_ids, seqlens_k, total_sequence_length, logits_to_keep, *past):
        model, spec = self.decoder, self.spec
        seq = input_ids.shape[1]
        x = model.embed_tokens(input_ids)  # (B, S, D)
        cos = sin = None  # set only for rotary as plain ops, outside the attention op
        if spec.positions == "learned":
            x = x + model.embed_positions(position_ids)
        elif not self.inner_rotary:
            cos = model.cos_table[position_ids].unsqueeze(1)  # (B, 1, S, rotary_dim // 2)
            sin = model.sin_table[position_ids].unsqueeze(1)
        residual = x
        normed = model.layers[0].input_norm(x)
        presents = []
        for i, layer in enumerate(self.layers):
            normed, residual, present_k, present_v = layer(normed, residual, seqlens_k, total_sequence_length,
                                                           past[2 * i], past[2 * i + 1], cos, sin)
            presents += [present_k, present_v]
        # each row's last real token sits at seqlens_k (prompt) or at 0 (one new token per row)
        lengths = seqlens_k.to(torch.int64)
        last = torch.minimum(lengths, torch.zeros_like(lengths) + (seq - 1))  # (B,), seq stays symbolic
        index = (last[:, None] - logits_to_keep + 1 + torch.arange(logits_to_keep)[None, :]).clamp(min=0)
        hidden = normed.gather(1, index[:, :, None].expand(-1, -1, spec.hidden_size))  # (B, keep, D)
        return (hidden, *presents)

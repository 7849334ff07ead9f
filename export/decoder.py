"""The one PyTorch decoder that every supported architecture is mapped onto, and that is traced to ONNX.

Architectures differ in a handful of switches (norm kind, gated MLP, biases, rotary vs learned positions,
sliding windows); `DecoderSpec` names them, and `architectures/` maps a Hugging Face config and state dict
onto a spec plus this module's parameter names. Keeping one module means one graph layout, one set of
node names and one place where the KV cache interface is defined.

Graph interface (the portable graph, past -> present by concatenation):
    input_ids        (batch, seq)              int64
    attention_mask   (batch, past + seq)       int64, 1 = real token, 0 = padding
    position_ids     (batch, seq)              int64
    logits_to_keep   ()                        int64, how many trailing positions get logits
    past_key_values.{i}.key / .value   (batch, kv_heads, past, head_dim)   float
  ->
    logits           (batch, logits_to_keep, vocab)
    present.{i}.key / .value           (batch, kv_heads, past + seq, head_dim)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fastllm.kernels.rotary import apply_rotary


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    mlp: str  # "gated_silu" (SwiGLU) | "gelu_tanh" (GPT-2)
    positions: str  # "rope" | "learned"
    rotary_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    tie_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # one per layer; None = full attention

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.mlp not in ("gated_silu", "gelu_tanh"):
            raise ValueError(f"mlp must be 'gated_silu' or 'gelu_tanh', got {self.mlp!r}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.positions == "rope" and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def make_norm(spec: DecoderSpec) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.norm_bias)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.spec = spec
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=spec.o_bias)
        self.scale = 1.0 / math.sqrt(hd)

    def forward(self, x, bias, cos, sin, past_k, past_v):
        spec = self.spec
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, spec.num_heads, spec.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        v = self.v_proj(x).view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        if spec.positions == "rope":
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        k = torch.cat((past_k, k), dim=2)  # (B, KV, T, hd)
        v = torch.cat((past_v, v), dim=2)
        present_k, present_v = k, v
        groups = spec.num_heads // spec.num_kv_heads
        if groups > 1:
            total = k.shape[2]
            k = k[:, :, None].expand(batch, spec.num_kv_heads, groups, total, spec.head_dim)
            k = k.reshape(batch, spec.num_heads, total, spec.head_dim)
            v = v[:, :, None].expand(batch, spec.num_kv_heads, groups, total, spec.head_dim)
            v = v.reshape(batch, spec.num_heads, total, spec.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale + bias  # (B, H, S, T)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, spec.num_heads * spec.head_dim)
        return self.o_proj(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.kind = spec.mlp
        d, i = spec.hidden_size, spec.intermediate_size
        if spec.mlp == "gated_silu":
            self.gate_proj = nn.Linear(d, i, bias=spec.mlp_bias)
            self.up_proj = nn.Linear(d, i, bias=spec.mlp_bias)
        else:
            self.up_proj = nn.Linear(d, i, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=spec.mlp_bias)

    def forward(self, x):
        if self.kind == "gated_silu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.input_norm = make_norm(spec)
        self.attn = Attention(spec, layer)
        self.post_attention_norm = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x, bias, cos, sin, past_k, past_v):
        attn_out, present_k, present_v = self.attn(self.input_norm(x), bias, cos, sin, past_k, past_v)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_norm(x))
        return x, present_k, present_v


class DecoderLM(nn.Module):
    def __init__(self, spec: DecoderSpec, cos_table: torch.Tensor | None = None, sin_table: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        if spec.positions == "learned":
            self.embed_positions = nn.Embedding(spec.max_context, spec.hidden_size)
        else:
            # (max_context, rotary_dim // 2): precomputed by the architecture adapter with the model's own rope
            # settings (scaling included), so the graph only gathers rows by position.
            self.register_buffer("cos_table", cos_table.float(), persistent=False)
            self.register_buffer("sin_table", sin_table.float(), persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = make_norm(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def attention_bias(self, attention_mask, seq: int, past: int, window: int | None, dtype):
        """Additive bias (batch, 1, seq, past + seq): 0 where a query may attend, the dtype's min elsewhere."""
        total = attention_mask.shape[1]
        key_index = torch.arange(total, device=attention_mask.device)
        query_index = torch.arange(seq, device=attention_mask.device) + past
        allowed = key_index[None, :] <= query_index[:, None]  # (S, T) causal
        if window is not None:
            allowed = allowed & (query_index[:, None] - key_index[None, :] < window)
        allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)
        zero = torch.zeros((), dtype=dtype)
        return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
        spec = self.spec
        seq = input_ids.shape[1]
        past_len = past[0].shape[2]
        x = self.embed_tokens(input_ids)  # (B, S, D)
        cos = sin = None
        if spec.positions == "learned":
            x = x + self.embed_positions(position_ids)
        else:
            cos = self.cos_table[position_ids].unsqueeze(1)  # (B, 1, S, rotary_dim // 2)
            sin = self.sin_table[position_ids].unsqueeze(1)
        windows = spec.sliding_windows or (None,) * spec.num_layers
        biases = {w: self.attention_bias(attention_mask, seq, past_len, w, x.dtype) for w in set(windows)}
        presents = []
        for i, layer in enumerate(self.layers):
            x, present_k, present_v = layer(x, biases[windows[i]], cos, sin, past[2 * i], past[2 * i + 1])
            presents += [present_k, present_v]
        x = self.norm(x)
        keep = torch.arange(logits_to_keep) + (seq - logits_to_keep)
        return (x.index_select(1, keep), *presents)  # (B, logits_to_keep, D): DecoderGraph applies the LM head


class DecoderGraph(nn.Module):
    """What is traced: a decoder body (DecoderLM, or FusedDecoder for the fused graph) -> (hidden states at the kept
    positions, *present caches), named "model", and the LM head beside it. The exporter names each node after the
    modules it runs in, so weight MatMuls read /model/layers.3/attn/q_proj/MatMul and /lm_head/MatMul."""

    def __init__(self, body: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.model = body
        self.lm_head = lm_head

    def forward(self, *inputs):
        hidden, *presents = self.model(*inputs)
        return (self.lm_head(hidden), *presents)  # logits (B, logits_to_keep, V)

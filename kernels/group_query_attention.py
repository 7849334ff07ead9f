"""com.microsoft GroupQueryAttention: attention over a preallocated KV buffer that is written in place.

Semantics (ONNX Runtime contrib op, as used here):
    query, key, value (B, S, H * hd), (B, S, KV * hd), (B, S, KV * hd)
                     or packed: query (B, S, (H + 2 KV) * hd) = q | k | v, key and value omitted
    past_key/value   (B, KV, capacity, hd)       the cache buffer; bound to the same memory as present_key/value
    seqlens_k        (B,) int32                  per row: tokens in the cache after this step, minus one
    total_sequence_length () int32               max over rows of seqlens_k + 1
    cos/sin_cache    (max_positions, rotary_dim / 2)   when do_rotary=1
  ->
    output           (B, S, H * hd)
    present_key/value (B, KV, capacity, hd)

Rows are right padded: row b's tokens sit at cache positions 0 .. seqlens_k[b]. When S equals
total_sequence_length the call is a prompt: every row's new tokens go to positions 0 .. S - 1 and take rotary
positions 0 .. S - 1. Otherwise (S == 1) row b's token goes to position seqlens_k[b] and takes that rotary
position. A query at cache position p attends keys 0 .. p; with a window (local_window_size = W > 0) only
keys p - W < k <= p, as Hugging Face's sliding window (measured against onnxruntime 1.32 in the kernel test).

Lowering: the TorchScript exporter turns `GroupQueryAttentionFn` into one node through its `symbolic`, and
runs the PyTorch reference below while tracing (and in eager use), so the traced graph and the eager module
agree by construction and the kernel test below checks ONNX Runtime against the same reference.
"""

from __future__ import annotations

import torch

from fastllm.kernels.rotary import apply_rotary


def gqa_reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None,
                  sin_cache=None, *, num_heads: int, kv_heads: int, local_window_size: int = -1):
    batch, seq, _ = query.shape
    if key is None:  # packed q | k | v
        head_dim = query.shape[-1] // (num_heads + 2 * kv_heads)
        query, key, value = query.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    head_dim = query.shape[-1] // num_heads
    q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2)  # (B, H, S, hd)
    k = key.view(batch, seq, kv_heads, head_dim).transpose(1, 2)  # (B, KV, S, hd)
    v = value.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    scale = head_dim ** -0.5
    first_prompt = seq == int(total_sequence_length)
    out = torch.zeros(batch, num_heads, seq, head_dim, dtype=query.dtype)
    for b in range(batch):
        total = int(seqlens_k[b]) + 1
        start = 0 if first_prompt else total - seq
        positions = torch.arange(start, start + seq)
        qb, kb = q[b], k[b]
        if cos_cache is not None:
            cos, sin = cos_cache[positions][None], sin_cache[positions][None]  # (1, S, rotary_dim / 2)
            qb, kb = apply_rotary(qb, cos, sin), apply_rotary(kb, cos, sin)
        present_key[b, :, start : start + seq] = kb
        present_value[b, :, start : start + seq] = v[b]
        rows = min(seq, total - start)  # queries past a short row's end (prompt padding) are left as zeros
        keys = present_key[b, :, :total].repeat_interleave(num_heads // kv_heads, dim=0)  # (H, total, hd)
        values = present_value[b, :, :total].repeat_interleave(num_heads // kv_heads, dim=0)
        scores = torch.matmul(qb[:, :rows], keys.transpose(1, 2)) * scale  # (H, rows, total)
        query_pos = torch.arange(start, start + rows)[:, None]
        key_pos = torch.arange(total)[None, :]
        allowed = key_pos <= query_pos
        if local_window_size > 0:
            allowed = allowed & (key_pos > query_pos - local_window_size)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[b, :, :rows] = torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value


class GroupQueryAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                sin_cache, num_heads, kv_heads, local_window_size):
        return gqa_reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                             sin_cache, num_heads=num_heads, kv_heads=kv_heads, local_window_size=local_window_size)

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                 sin_cache, num_heads, kv_heads, local_window_size):
        def absent(x):
            return x is None or (hasattr(x, "node") and x.node().mustBeNone())

        rotary = not absent(cos_cache)
        packed = absent(key)
        if packed:  # q | k | v in `query`: key and value are omitted inputs
            key = value = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        inputs = [query, key, value, past_key, past_value, seqlens_k, total_sequence_length]
        if rotary:
            inputs += [cos_cache, sin_cache]
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", *inputs, num_heads_i=num_heads, kv_num_heads_i=kv_heads,
            do_rotary_i=int(rotary), local_window_size_i=local_window_size, outputs=3)
        out.setType(query.type().with_sizes([None, None, None]) if packed else query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                          cos_cache=None, sin_cache=None, *, num_heads: int, kv_heads: int,
                          local_window_size: int = -1):
    """Eager: the reference. Traced: one GroupQueryAttention node (rotary inside it when cos/sin are given; q, k
    and v packed in `query` when key and value are None)."""
    return GroupQueryAttentionFn.apply(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                       cos_cache, sin_cache, num_heads, kv_heads, local_window_size)

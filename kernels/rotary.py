"""Rotary position embedding (non-interleaved, "rotate half"), on the first `rotary_dim` channels."""

from __future__ import annotations

import torch


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (..., seq, head_dim); cos/sin: (..., seq, rotary_dim // 2), broadcastable to x's leading dims."""
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((sin, sin), dim=-1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)

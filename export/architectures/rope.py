"""Rotary tables computed by the source model's own rotary module, so every rope variant it supports and
its attention scaling come out exactly as in the reference."""

from __future__ import annotations

import torch

from fastllm.export.registry import unsupported_setting

# Rope types whose frequencies depend on the current sequence length: a single static table cannot match them.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def rope_tables(hf_model, config, rotary_dim: int, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_context, rotary_dim // 2), for positions 0 .. max_context - 1."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise unsupported_setting(type(hf_model).__name__, f"rope_type {rope_type!r} (sequence-length dependent)")
    rotary = hf_model.model.rotary_emb
    positions = torch.arange(max_context)[None]  # (1, max_context)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # (1, max_context, rotary_dim), halves repeated
    if cos.shape[-1] != rotary_dim:
        raise unsupported_setting(type(hf_model).__name__, f"rotary width {cos.shape[-1]} != expected {rotary_dim}")
    half = rotary_dim // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()

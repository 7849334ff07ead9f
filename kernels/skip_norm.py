"""Residual add fused with the following norm: com.microsoft SkipSimplifiedLayerNormalization (RMSNorm) and
SkipLayerNormalization (LayerNorm). Both return (norm(x + skip), x + skip): the normed input of the next block and
the new residual stream, so the residual add costs no separate pass over memory."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def skip_rms_norm_reference(x, skip, weight, eps: float):
    total = x + skip
    normed = total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), total


def skip_layer_norm_reference(x, skip, weight, bias, eps: float):
    total = x + skip
    return F.layer_norm(total, (total.shape[-1],), weight, bias, eps), total


class SkipRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        return skip_rms_norm_reference(x, skip, weight, eps)

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        out, _mean, _inv_std, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight,
                                           epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


class SkipLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, weight, bias, eps):
        return skip_layer_norm_reference(x, skip, weight, bias, eps)

    @staticmethod
    def symbolic(g, x, skip, weight, bias, eps):
        out, _mean, _inv_std, total = g.op("com.microsoft::SkipLayerNormalization", x, skip, weight, bias,
                                           epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def skip_norm(norm: torch.nn.Module, x, skip):
    """(norm(x + skip), x + skip) for an RMSNorm (weight, eps) or an nn.LayerNorm with bias."""
    if isinstance(norm, torch.nn.LayerNorm):
        return SkipLayerNormFn.apply(x, skip, norm.weight, norm.bias, norm.eps)
    return SkipRMSNormFn.apply(x, skip, norm.weight, norm.eps)

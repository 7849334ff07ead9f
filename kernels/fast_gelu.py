"""GELU, tanh approximation, with the preceding bias add: com.microsoft FastGelu(x, bias)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def fast_gelu_reference(x, bias):
    return F.gelu(x + bias, approximate="tanh")


class FastGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        return fast_gelu_reference(x, bias)

    @staticmethod
    def symbolic(g, x, bias):
        return g.op("com.microsoft::FastGelu", x, bias).setType(x.type())


def fast_gelu(x, bias):
    return FastGeluFn.apply(x, bias)

"""Architectures plug in here: `@register("LlamaForCausalLM")` maps a Hugging Face model onto `DecoderLM`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastllm.errors import UnsupportedArchitectureError
from fastllm.export.decoder import DecoderSpec


@dataclass
class Adapted:
    """What an architecture adapter returns: the spec, DecoderLM-named weights and, for rope, the tables."""

    spec: DecoderSpec
    state_dict: dict[str, torch.Tensor]
    cos_table: torch.Tensor | None = None  # (max_context, rotary_dim // 2)
    sin_table: torch.Tensor | None = None


Adapter = Callable[["torch.nn.Module", int], Adapted]  # (hf_model, max_context) -> Adapted

_ADAPTERS: dict[str, Adapter] = {}


def register(*architectures: str):
    def wrap(fn: Adapter) -> Adapter:
        for name in architectures:
            _ADAPTERS[name] = fn
        return fn

    return wrap


def supported() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def adapter_for(architecture: str) -> Adapter:
    _load_builtin()
    try:
        return _ADAPTERS[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported architectures: {', '.join(supported())}"
        ) from None


def unsupported_setting(architecture: str, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"{architecture}: {what} is not supported by the exporter yet")


def _load_builtin() -> None:
    import fastllm.export.architectures  # noqa: F401  (registers the built-in adapters)

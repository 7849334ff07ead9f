"""Perplexity of a PyTorch (Hugging Face) model, on exactly the windows the runtime's evaluator uses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastllm.perplexity import LOGITS_BUDGET, Perplexity, windows


@torch.no_grad()
def torch_perplexity(model, ids, *, window: int) -> Perplexity:
    inputs, targets = windows(ids, window)
    rows = max(1, LOGITS_BUDGET // (window * model.config.vocab_size))
    total = 0.0
    for start in range(0, len(inputs), rows):
        x = torch.from_numpy(inputs[start : start + rows])
        y = torch.from_numpy(targets[start : start + rows])
        logits = model(input_ids=x).logits.double()
        total -= torch.log_softmax(logits, dim=-1).gather(-1, y[..., None]).sum().item()
    count = targets.size
    return Perplexity(ppl=math.exp(total / count), mean_nll=total / count, tokens=count, window=window)


def hf_perplexity(path: Path, text: str, *, window: int) -> Perplexity:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    return torch_perplexity(model, np.asarray(ids), window=window)

"""Perplexity of a model directory on a text, through the runtime: scored in non-overlapping windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastllm.errors import InvalidParameterError, InvalidPromptError
from fastllm.score import LOGITS_BUDGET, score_ids, token_logprobs

__all__ = ["LOGITS_BUDGET", "Perplexity", "log_softmax_pick", "perplexity", "windows"]


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    mean_nll: float
    tokens: int  # predicted tokens
    window: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "mean_nll": self.mean_nll, "tokens": self.tokens, "window": self.window}


def windows(ids, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets, each (n, window): window r predicts ids[r*w + 1 : (r+1)*w + 1] from ids[r*w : (r+1)*w]."""
    ids = np.asarray(ids, dtype=np.int64)
    n = (len(ids) - 1) // window
    if n < 1:
        raise InvalidPromptError(f"the text has {len(ids)} tokens; perplexity needs more than one window of "
                                 f"{window} tokens (pass a longer text or a smaller window)")
    return ids[: n * window].reshape(n, window), ids[1 : n * window + 1].reshape(n, window)


def log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (B, S, V), targets (B, S) -> log p(target), (B, S), in float64."""
    return token_logprobs(logits, targets)


def perplexity(engine, text_or_ids, *, window: int | None = None) -> Perplexity:
    """Over the whole windows of `window` tokens (default min(context, 512)) the text fills; the tail is left out."""
    m = engine.manifest
    window = window or min(m.max_context, 512)
    if not 2 <= window <= m.max_context:
        raise InvalidParameterError(f"window must be in [2, {m.max_context}] for this model, got {window}")
    prompts, single = engine.prompt_ids(text_or_ids)
    if not single:
        raise InvalidPromptError("perplexity takes one text or one list of token ids, not a batch")
    count = windows(prompts[0], window)[1].size
    (score,) = score_ids(engine, [prompts[0][: count + 1]], window=window)
    return Perplexity(ppl=math.exp(-score.mean), mean_nll=-score.mean, tokens=count, window=window)

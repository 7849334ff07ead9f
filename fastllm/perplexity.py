"""Perplexity of a model directory on a text, through the runtime: full logits over non-overlapping windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastllm.errors import InvalidParameterError, InvalidPromptError

LOGITS_BUDGET = 64 * 2**20  # floats of logits held at once (batch x window x vocab)


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
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1))
    return np.take_along_axis(x, targets[..., None], axis=-1)[..., 0] - log_z


def perplexity(engine, text_or_ids, *, window: int | None = None) -> Perplexity:
    m = engine.manifest
    window = window or min(m.max_context, 512)
    if not 2 <= window <= m.max_context:
        raise InvalidParameterError(f"window must be in [2, {m.max_context}] for this model, got {window}")
    ids = engine.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    inputs, targets = windows(ids, window)
    rows = max(1, LOGITS_BUDGET // (window * m.vocab_size))
    session, total = engine.session, 0.0
    for start in range(0, len(inputs), rows):
        x, y = inputs[start : start + rows], targets[start : start + rows]
        cache, binding = session.new_cache(len(x), window, 0), session.ort.io_binding()
        logits = session.forward(cache, binding, cache.prefill(x.tolist(), 0), logits_to_keep=window)
        total -= float(log_softmax_pick(logits, y).sum())
    count = targets.size
    return Perplexity(ppl=math.exp(total / count), mean_nll=total / count, tokens=count, window=window)

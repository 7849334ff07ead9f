"""Scoring: the log-probability a model gives each token of a prompt, from full-sequence logits.

The one place that drives the session for whole-prompt logits (`Engine.score`, perplexity, export verification and
the quantization quality measurements all come here):

- `score_ids(engine, prompts, top_logprobs=N, window=W, stride=S) -> list[Score]`: per prompt position after the
  first, log p(actual next token) and optionally the N most likely alternatives, with sum and mean.
- `prompt_logits(engine, ids) -> (S, V)`: the raw logits at every position of one prompt (KL divergences need the
  whole next-token distribution).

Memory stays bounded for long prompts: rows of one length go through the graph together only while their logits fit
in LOGITS_BUDGET floats; a longer row goes alone, in steps of up to CHUNK positions through the KV cache (the fused
graph; the portable graph takes a prompt in one step), each step returning the logits of its own positions
(`logits_to_keep`). The log-softmax runs in float64 on a few positions at a time (SOFTMAX_BUDGET).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fastllm.errors import ContextLengthError, InvalidParameterError
from fastllm.sampler import TokenLogprob
from fastllm.scheduler import PREFILL_CHUNK

LOGITS_BUDGET = 64 * 2**20  # float32 logits held at once (rows x positions x vocab): 256 MB
SOFTMAX_BUDGET = 4 * 2**20  # float64 values of one log-softmax pass (positions x vocab): 32 MB
CHUNK = PREFILL_CHUNK  # positions per step of a row too long for the budget: the engine's prefill chunk


@dataclass(frozen=True, eq=False)
class Score:
    """The log-likelihood of one prompt, position by position.

    Entry i is about prompt token i + 1 given tokens 0..i: a prompt of S tokens has S - 1 scored positions (a
    prompt of one token has none: empty arrays, total 0, mean and perplexity nan). The prompt's last token is only
    predicted, never fed, so a prompt of up to max_context + 1 tokens fits the model.
    """

    token_ids: np.ndarray  # (S-1,) int64: the scored tokens, prompt[1:]
    logprobs: np.ndarray  # (S-1,) float64: log p(token_ids[i] | prompt[: i + 1]), log-softmax of the raw logits
    top_ids: np.ndarray  # (S-1, top_logprobs) int64: the most likely next tokens, most likely first
    top_logprobs: np.ndarray  # (S-1, top_logprobs) float64: their log-probabilities

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def total(self) -> float:
        """Sum of the log-probabilities: the prompt's log-likelihood after its first token."""
        return float(self.logprobs.sum())

    @property
    def mean(self) -> float:
        return self.total / len(self) if len(self) else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean)

    def token_logprobs(self) -> list[TokenLogprob]:
        """Position by position, in the sampler's per-token type (as generated tokens' logprobs come back)."""
        return [TokenLogprob(int(t), float(lp), tuple(zip(map(int, ids), map(float, lps))))
                for t, lp, ids, lps in zip(self.token_ids, self.logprobs, self.top_ids, self.top_logprobs)]


# -- scoring ----------------------------------------------------------------------------------------------------------
def score_ids(engine, prompts: list[list[int]], *, top_logprobs: int = 0, window: int | None = None,
              stride: int | None = None) -> list[Score]:
    """A Score per prompt (lists of token ids, already checked against the vocabulary; see Engine.prompt_ids).

    Without `window`, a prompt is scored as one sequence, and one that needs more than the model's context is a
    ContextLengthError. With `window` W, a prompt is scored in windows of W fed tokens that start every `stride`
    tokens (default W: no overlap); each window starts afresh (no cache carried over) and scores only the positions
    no earlier window scored, so with stride < W every position after the first window sees W - stride or more
    tokens of context.
    """
    limit = engine.manifest.max_context
    vocab = engine.manifest.vocab_size
    _check_int("top_logprobs", top_logprobs, 0, vocab)
    if window is not None:
        _check_int("window", window, 1, limit)
    if stride is not None:
        if window is None:
            raise InvalidParameterError(f"stride {stride!r} needs a window; pass window=W as well")
        _check_int("stride", stride, 1, window)
    # pieces: (prompt index, first fed position, fed ids, first position to keep)
    pieces: list[tuple[int, int, list[int], int]] = []
    for i, ids in enumerate(prompts):
        fed = len(ids) - 1
        if window is None and fed > limit:
            name = "prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ContextLengthError(
                f"{name} has {len(ids)} tokens; scoring feeds all but the last ({fed}), more than the model's "
                f"context of {limit} tokens; shorten it to at most {limit + 1} tokens or score it in windows")
        pieces += [(i, start, ids[start:end], keep) for start, end, keep in _windows(fed, window or limit, stride)]
    results = [_empty(ids, top_logprobs) for ids in prompts]
    by_width: dict[int, list[tuple[int, int, list[int], int]]] = {}
    for piece in pieces:
        by_width.setdefault(len(piece[2]), []).append(piece)
    for width, group in sorted(by_width.items()):
        rows = max(1, LOGITS_BUDGET // (width * vocab))
        for first in range(0, len(group), rows):
            batch = group[first : first + rows]
            for start, logits in _logits_steps(engine, [p[2] for p in batch]):
                for row, (i, offset, _, keep) in enumerate(batch):
                    at = np.arange(offset + start, offset + start + logits.shape[1])  # prompt positions of the step
                    kept = at >= keep
                    if kept.any():
                        _pick_into(results[i], logits[row, kept], at[kept], top_logprobs)
    for result in results:
        for array in (result.token_ids, result.logprobs, result.top_ids, result.top_logprobs):
            array.flags.writeable = False
    return results


def _windows(fed: int, window: int, stride: int | None) -> Iterator[tuple[int, int, int]]:
    """(start, end, keep) of each window over `fed` positions: feed [start, end), keep positions >= keep."""
    stride = stride or window
    start, done = 0, 0
    while done < fed:
        end = min(start + window, fed)
        yield start, end, done
        done, start = end, start + stride


def _empty(ids: list[int], top: int) -> Score:
    n = len(ids) - 1
    return Score(token_ids=np.asarray(ids[1:], dtype=np.int64), logprobs=np.zeros(n),
                 top_ids=np.zeros((n, top), dtype=np.int64), top_logprobs=np.zeros((n, top)))


def _pick_into(result: Score, logits: np.ndarray, positions: np.ndarray, top: int) -> None:
    """Fill result's entries at `positions` from logits (P, V) at those positions."""
    targets = result.token_ids[positions]
    step = max(1, SOFTMAX_BUDGET // logits.shape[-1])
    for i in range(0, len(positions), step):
        lp = log_softmax(logits[i : i + step])  # (p, V) float64
        at = positions[i : i + step]
        result.logprobs[at] = np.take_along_axis(lp, targets[i : i + step, None], axis=-1)[:, 0]
        if top:  # selected on the float32 logits (the same order, half the memory traffic), valued in float64
            result.top_ids[at], result.top_logprobs[at] = top_n(lp, top, order=logits[i : i + step])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (..., V), targets (...) -> log p(target) (...), float64, a few positions at a time."""
    flat, ids = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = np.empty(len(ids))
    step = max(1, SOFTMAX_BUDGET // flat.shape[-1])
    for i in range(0, len(ids), step):
        out[i : i + step] = np.take_along_axis(log_softmax(flat[i : i + step]), ids[i : i + step, None], -1)[:, 0]
    return out.reshape(targets.shape)


def top_n(logprobs: np.ndarray, n: int, *, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n largest of each row of (P, V): ids (P, n) and values (P, n), largest first, ties by lower id.

    order: values in the same order as logprobs (the logits they came from) to select on, when cheaper. Each row's
    candidates are the entries above a threshold guessed from a strided sample of ~1k entries, checked to hold at
    least n (else the whole row): a compare pass instead of a partition of the vocabulary.
    """
    order = logprobs if order is None else order
    vocab = logprobs.shape[-1]
    if n == 0:
        return np.zeros((len(logprobs), 0), dtype=np.int64), np.zeros((len(logprobs), 0))
    stride = max(1, vocab // 1024)
    ids = np.empty((len(logprobs), n), dtype=np.int64)
    for row, x in enumerate(order):
        sample = x[::stride]
        rank = min(sample.size, 2 * -(-n // stride) + 6)  # ~rank * stride entries of x reach the sample's rank-th
        candidates = np.flatnonzero(x >= np.partition(sample, sample.size - rank)[sample.size - rank])
        if candidates.size < n:
            candidates = np.arange(vocab)
        values = x[candidates]  # candidates are in id order: ties at the n-th value go to the lower ids
        kth = np.partition(values, values.size - n)[values.size - n]
        above = candidates[values > kth]
        ids[row] = np.concatenate([above, candidates[values == kth][: n - above.size]])
    values = np.take_along_axis(logprobs, ids, axis=-1)
    by_value = np.lexsort((ids, -values), axis=-1)
    return np.take_along_axis(ids, by_value, axis=-1), np.take_along_axis(values, by_value, axis=-1)


# -- raw logits -------------------------------------------------------------------------------------------------------
def prompt_logits(engine, ids: list[int], *, decode_after: int | None = None) -> np.ndarray:
    """Logits at every position of one prompt, (S, V) float32: row j predicts the token after ids[j].

    decode_after=k feeds positions k.. one per step through the KV cache, as generation decodes them (export
    verification compares both paths with PyTorch); otherwise the prompt is prefilled as scoring does.
    """
    limit = engine.manifest.max_context
    if len(ids) > limit:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens but the model's context is {limit} tokens")
    out = np.empty((len(ids), engine.manifest.vocab_size), dtype=np.float32)  # (S, V)
    for start, logits in _logits_steps(engine, [list(ids)], decode_after=decode_after):
        out[start : start + logits.shape[1]] = logits[0]
    return out


def _logits_steps(engine, rows: list[list[int]], *, decode_after: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """Rows of one length through the graph: yields (first position, logits (B, k, V) of positions first..first+k).

    One step for the whole batch when its logits fit LOGITS_BUDGET; a single row beyond it goes in steps of up to
    CHUNK positions where the graph's cache takes them (fused graph), else in one step.
    """
    session, vocab = engine.session, engine.manifest.vocab_size
    batch, width = len(rows), len(rows[0])
    prefill = width if decode_after is None else decode_after
    chunk = prefill if batch * prefill * vocab <= LOGITS_BUDGET else min(CHUNK, max(1, LOGITS_BUDGET // vocab))
    cache, binding = session.new_cache(batch, prefill, width - prefill), session.ort.io_binding()
    try:
        start = 0
        for feeds in cache.prefill_steps([r[:prefill] for r in rows], 0, chunk):
            k = feeds["input_ids"].shape[1]
            yield start, session.forward(cache, binding, feeds, logits_to_keep=k)
            start += k
        ids = np.array(rows, dtype=np.int64)  # (B, width)
        for start in range(prefill, width):
            step = np.ascontiguousarray(ids[:, start : start + 1])  # (B, 1)
            yield start, session.forward(cache, binding, cache.decode(step))
    finally:
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()


def _check_int(field: str, value, low: int, high: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or not low <= value <= high:
        raise InvalidParameterError(f"{field} must be an integer in [{low}, {high}] for this model, got {value!r}")

"""Prompt-lookup drafts for speculative decoding of a single request, and the rule that sizes them.

A draft is the continuation of the most recent earlier occurrence of the text's last n tokens (n from NGRAM_MAX
down to NGRAM_MIN) in the prompt and the tokens generated so far; where that occurrence is closer to the end than
the draft is long, the text is taken to go on repeating with that period (a loop). The scheduler verifies the drafts of one request
in one multi-token step on its slot (see Scheduler._speculate_step): each position's token is drawn by the sampler
exactly as plain decoding draws it (same params, rng and penalty history), and the step goes on while the drawn
token equals the draft's. For a draft that proposes one token (no distribution) that is the standard acceptance
rule: the draft is kept with the target probability of that token, and on a rejection the token drawn is one from
the target distribution without it. So the tokens are those of plain decoding, greedy or sampled (up to the float
rounding of a step of several positions against steps of one). Positions written for rejected drafts stay in the
slot beyond its length, where nothing reads them and the next step overwrites them.

The draft length adapts per request: it grows while whole drafts are kept and shrinks when they are not; after a
step that keeps none of its draft the request decodes plainly for a while (doubling each time, reset by a step
that keeps one), so text that does not repeat itself costs almost nothing.
"""

from __future__ import annotations

import numpy as np

NGRAM_MAX = 4  # the longest tail that is looked up
NGRAM_MIN = 3  # the shortest (shorter tails match too often by chance to pay)
DRAFT_MIN, DRAFT_START, DRAFT_MAX = 1, 4, 8  # tokens drafted per step
BACKOFF_MAX = 64  # the most plain steps after a step that kept none of its draft


class PromptLookup:
    """The ids seen by one request (prompt and generated) and its draft length; `draft()` proposes tokens."""

    def __init__(self, prompt_ids, capacity: int):
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        self._ids = np.empty(max(capacity, prompt.size + 1), dtype=np.int64)
        self._ids[: prompt.size] = prompt
        self._size = prompt.size
        self.length = DRAFT_START  # tokens to draft next
        self._backoff = 0  # plain steps still to take
        self._penalty = 1  # the next backoff
        self.drafted = 0
        self.kept = 0

    def add(self, token: int) -> None:
        if self._size == self._ids.size:
            self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
        self._ids[self._size] = token
        self._size += 1

    def draft(self, limit: int) -> list[int]:
        """Up to min(self.length, limit) tokens that followed the latest earlier occurrence of the longest tail
        (NGRAM_MAX..NGRAM_MIN tokens) of the ids; [] when none occurs, while backing off, or when limit < 1."""
        if self._backoff:
            self._backoff -= 1
            return []
        want = min(self.length, limit)
        ids, size = self._ids, self._size
        if want < 1 or size <= NGRAM_MIN:
            return []
        for n in range(min(NGRAM_MAX, size - 1), NGRAM_MIN - 1, -1):
            tail = ids[size - n : size]
            # starts i < size - n of earlier occurrences of the tail: ids[i:i + n] == tail
            hit = ids[: size - n] == tail[0]
            for j in range(1, n):
                hit &= ids[j : size - n + j] == tail[j]
            starts = np.flatnonzero(hit)
            if starts.size:  # the latest occurrence, d positions before the tail: the text repeats with period d
                d = size - n - int(starts[-1])
                draft = ids[size - d : min(size - d + want, size)].tolist()
                while len(draft) < want:  # a period shorter than the draft: it goes on repeating
                    draft.append(draft[len(draft) - d])
                return draft
        return []

    def update(self, drafted: int, kept: int) -> None:
        """After a verify step that drafted `drafted` tokens and kept `kept` of them."""
        self.drafted += drafted
        self.kept += kept
        if kept == drafted:
            self.length = min(self.length + 2, DRAFT_MAX)
            self._penalty = 1
        elif kept == 0:
            self.length = max(self.length // 2, DRAFT_MIN)
            self._backoff = self._penalty
            self._penalty = min(2 * self._penalty, BACKOFF_MAX)
        else:
            self.length = max(kept + 1, DRAFT_MIN)
            self._penalty = 1

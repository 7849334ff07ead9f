"""What a request is made of as it decodes: its Sequence (tokens, text, stop strings, finish reason), the Step
each new token yields and the Completion it ends with. Shared by the engine's loops (fastllm.scheduler)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastllm.sampler import SamplingParams, TokenHistory, TokenLogprob
from fastllm.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids, including the id that ended generation
    finish_reason: str  # "stop" (EOS, stop id or stop string) | "length" (max_new_tokens reached) | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # request start -> first token (tokenization and prefill)
    tpot_s: float  # mean time per output token after the first
    total_s: float
    # When params.logprobs is not None: one per token of token_ids (the ending id included), from the logits the
    # sampler drew it from, after the penalties and the temperature (see TokenLogprob).
    logprobs: tuple[TokenLogprob, ...] | None = None
    # When params.prompt_logprobs is not None: one per prompt token, entry i about prompt token i given tokens 0..i-1,
    # from the raw logits (as Engine.score); entry 0 is None (the first token has nothing before it to predict it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed for this request)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.total_s if self.total_s > 0 else float("inf")


@dataclass(frozen=True)
class Step:
    """One generated token of one prompt, as Engine.steps() yields it: what a server streams per token."""

    token_id: int | None  # None only on the step that reports a cancellation
    text: str  # text that became final with this token: "" while held back (a stop string's possible start, an
    # incomplete character); on the last step, everything left (the text of all steps joins to Completion.text)
    logprob: TokenLogprob | None  # when params.logprobs is not None (as Completion.logprobs)
    finish_reason: str | None  # "stop" | "length" | "cancelled" on the prompt's last step, else None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the prompt's first step only, when
    # params.prompt_logprobs is not None (as Completion.prompt_logprobs)


class StopStrings:
    """Finds stop strings in text that grows piece by piece, looking only at text that can hold a new match.

    A match not found before must end inside the new piece, so it starts at most longest - 1 characters before it:
    each feed() searches those characters plus the piece (`examined` says how many), never the whole text. The
    hold-back (the longest end of the text that could still grow into a stop string) is updated from the previous
    one: it can grow by at most the length of the piece.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        # per stop string: its proper prefix lengths n, longest first, keyed by the prefix's last character
        self.prefixes = [{c: [n for n in range(len(s) - 1, 0, -1) if s[n - 1] == c] for c in set(s)} for s in stops]
        self.tail = ""  # the last longest - 1 characters fed: where a match ending in the next piece may begin
        self.hold = 0  # characters at the end of the text fed so far that are the start of some stop string
        self.examined = 0  # characters the last feed() looked at

    def feed(self, piece: str) -> int | None:
        """Take the next piece of text. If the text now holds a stop string, returns where the earliest one starts,
        counted from the start of `piece` (negative when it begins in earlier text); else None."""
        if not self.stops or not piece:
            self.examined = 0
            return None
        window = self.tail + piece  # bounded: longest - 1 + len(piece) characters
        self.examined = len(window)
        hits = [at for at in (window.find(s) for s in self.stops) if at >= 0]
        if hits:
            return min(hits) - len(self.tail)
        most = self.hold + len(piece)  # the hold-back grows by at most the piece
        self.hold = max(self._held(stop, prefixes, window, most) for stop, prefixes in zip(self.stops, self.prefixes))
        self.tail = window[-(self.longest - 1):] if self.longest > 1 else ""
        return None

    @staticmethod
    def _held(stop: str, prefixes: dict[str, list[int]], window: str, most: int) -> int:
        """The longest n <= most such that the window ends with the first n characters of `stop`."""
        for n in prefixes.get(window[-1], ()):
            if n <= most and window.endswith(stop[:n]):
                return n
        return 0


class Sequence:
    """One row of a request: its tokens, its text so far and why it finished.

    detokenize=False (Engine.tokens() without stop strings) keeps no text at all: nothing is decoded per token.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, manifest, tokenizer, seed: int | None,
                 detokenize: bool = True):
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.history = TokenHistory(manifest.vocab_size, prompt_ids)
        self.rng = np.random.default_rng(seed)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(manifest.eos_token_ids))
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer and detokenize else None
        self.stops = StopStrings(params.stop)
        self.text = ""
        self.streamed = 0  # characters of text handed to a stream
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    def append(self, token: int, logprob: TokenLogprob | None = None) -> None:
        self.token_ids.append(token)
        self.history.add(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:  # the ending id is kept in token_ids, not in the text
            self.finish_reason = "stop"
        elif self.detok is not None and self._add_text(self.detok.add(token)):
            return
        if self.finish_reason is None and len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            self._add_text(self.detok.flush())

    def _add_text(self, piece: str) -> bool:
        """Append a decoded piece; cut the text before a stop string it completes (then finished: True)."""
        at = self.stops.feed(piece)
        if at is None:
            self.text += piece
            return False
        self.text = self.text[: len(self.text) + at] if at < 0 else self.text + piece[:at]
        self.finish_reason = "stop"
        return True

    def streamable(self) -> str:
        """New text that can no longer turn into a stop string."""
        end = len(self.text) if self.finish_reason is not None else len(self.text) - self.stops.hold
        piece = self.text[self.streamed : end]
        self.streamed = max(self.streamed, end)
        return piece


def completion(seq: Sequence, start: float, first: float | None, last: float | None,
               cached_tokens: int = 0) -> Completion:
    """The Completion of a finished sequence; start: when it was submitted, first / last: its first / last token."""
    n = len(seq.token_ids)
    first = first or start
    last = last or first
    return Completion(
        text=seq.text,
        token_ids=tuple(seq.token_ids),
        finish_reason=seq.finish_reason or "length",
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=n,
        ttft_s=first - start,
        tpot_s=(last - first) / (n - 1) if n > 1 else 0.0,
        total_s=last - start,
        logprobs=None if seq.logprobs is None else tuple(seq.logprobs),
        prompt_logprobs=seq.prompt_logprobs,
        cached_tokens=cached_tokens,
    )

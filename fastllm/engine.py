"""The engine: load a model directory, then generate, stream or step through tokens. All wrap one decode loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastllm.errors import ContextLengthError, InvalidParameterError, InvalidPromptError, ManifestError, ModelLoadError
from fastllm.manifest import Manifest
from fastllm.sampler import Sampler, SamplingParams, TokenHistory, TokenLogprob, as_params
from fastllm.score import score_ids
from fastllm.session import Device, Session
from fastllm.tokenizer import IncrementalDetokenizer, Tokenizer

PREFILL_CHUNK = 256  # prompt positions per prefill step (fused graph, rows of one length); measured best of 64-512


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids, including the id that ended generation
    finish_reason: str  # "stop" (EOS, stop id or stop string) | "length" (max_new_tokens reached)
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

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.total_s if self.total_s > 0 else float("inf")


@dataclass(frozen=True)
class Step:
    """One generated token of one prompt, as Engine.steps() yields it: what a server streams per token."""

    token_id: int
    text: str  # text that became final with this token: "" while held back (a stop string's possible start, an
    # incomplete character); on the last step, everything left (the text of all steps joins to Completion.text)
    logprob: TokenLogprob | None  # when params.logprobs is not None (as Completion.logprobs)
    finish_reason: str | None  # "stop" | "length" on the prompt's last step, else None
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

    def __init__(self, prompt_ids: list[int], params: SamplingParams, engine: Engine, seed: int | None,
                 detokenize: bool = True):
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.history = TokenHistory(engine.manifest.vocab_size, prompt_ids)
        self.rng = np.random.default_rng(seed)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.manifest.eos_token_ids))
        self.detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids) if engine.tokenizer and detokenize else None
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


class Engine:
    """A loaded model. Safe to share between threads: each request owns its cache, binding and RNG."""

    def __init__(self, directory: Path, manifest: Manifest, session: Session, tokenizer: Tokenizer | None):
        self.directory = directory
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer

    # -- public API -------------------------------------------------------------------------------------------
    def generate(self, prompt, params: SamplingParams | Mapping | None = None) -> Completion | list[Completion]:
        """A prompt (text or token ids) gives a Completion; a batch of prompts gives a list, in order.

        prompt: one prompt is a str, a list of token ids or a 1-D integer numpy array; a batch is a list of those or
        a 2-D integer array (batch, seq) (see prompt_token_ids). params: a SamplingParams, a dict of its fields, or
        None for default_params(), the model's generation config. The same holds for stream() and tokens().
        Prompt + max_new_tokens beyond the model's context is a ContextLengthError (no clamping here).
        """
        prompts, single = self.prompt_ids(prompt)
        params = self._params(params)
        start = time.perf_counter()
        first = last = None
        sequences: list[Sequence] = []
        for sequences in self._decode(prompts, params):
            last = time.perf_counter()
            first = first or last
        completions = [self._completion(s, start, first, last) for s in sequences]
        return completions[0] if single else completions

    def stream(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[str]:
        """Yields text pieces of one prompt as they decode. Closing the iterator early ends the request."""
        prompts, single = self.prompt_ids(prompt)
        if not single:
            raise InvalidPromptError("stream() takes one prompt; use generate() for a list of prompts")
        for (sequence,) in self._decode(prompts, self._params(params)):
            piece = sequence.streamable()
            if piece:
                yield piece

    def steps(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[tuple[Step | None, ...]]:
        """The decode loop token by token, with everything a server streams: after each step, a Step for every
        prompt (None once it finished) with the new id, the text that became final, its logprob when
        params.logprobs is set, the finish reason on the last one, and on the first one the prompt's logprobs when
        params.prompt_logprobs is set. A stream of text and logprobs is `step.text` and `step.logprob` of each
        step; the text of a prompt's steps joins to its Completion.text. Closing the iterator ends the request.
        """
        prompts, _ = self.prompt_ids(prompt)
        counts = [0] * len(prompts)
        for sequences in self._decode(prompts, self._params(params)):
            out = []
            for row, seq in enumerate(sequences):
                fresh = len(seq.token_ids) > counts[row]
                out.append(Step(seq.token_ids[-1], seq.streamable(),
                                None if seq.logprobs is None else seq.logprobs[-1], seq.finish_reason,
                                seq.prompt_logprobs if counts[row] == 0 else None) if fresh else None)
                counts[row] = len(seq.token_ids)
            yield tuple(out)

    def tokens(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[tuple[int | None, ...]]:
        """The decode loop at token level: after each step, the new id of every prompt (None once it finished).

        Nothing is detokenized, unless params has stop strings: those are matched on the text, so only then is it
        decoded, and the ids end where generate()'s would. Logprobs and text per token: steps().
        """
        prompts, _ = self.prompt_ids(prompt)
        params = self._params(params)
        counts = [0] * len(prompts)
        for sequences in self._decode(prompts, params, detokenize=bool(params.stop)):
            step = []
            for row, seq in enumerate(sequences):
                fresh = len(seq.token_ids) > counts[row]
                counts[row] = len(seq.token_ids)
                step.append(seq.token_ids[-1] if fresh else None)
            yield tuple(step)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidPromptError(f"{self.directory} has no tokenizer; pass token ids instead of text")
        _check_text(text, "text")
        return self.tokenizer.encode(text)

    def score(self, prompt, *, top_logprobs: int = 0, window: int | None = None, stride: int | None = None):
        """The log-probability of each prompt token after the first under the model, optionally with the
        `top_logprobs` most likely alternatives at each position: a fastllm.score.Score (arrays, sum, mean,
        perplexity) for one prompt, a list for a batch (prompts as generate() takes them; see prompt_token_ids).

        Computed from the raw logits (no temperature or penalties), log-softmax in float64. A prompt longer than the
        context (+1: its last token is only predicted) is a ContextLengthError unless `window` asks to score it in
        windows of that many tokens every `stride` (see fastllm.score.score_ids).
        """
        from fastllm.score import score_ids

        prompts, single = self.prompt_ids(prompt)
        scores = score_ids(self, prompts, top_logprobs=top_logprobs, window=window, stride=stride)
        return scores[0] if single else scores

    def prompt_ids(self, prompt) -> tuple[list[list[int]], bool]:
        """The token ids of each prompt, checked against the vocabulary, and whether `prompt` was one prompt.

        The one rule for what generate, stream and tokens accept: see prompt_token_ids().
        """
        return prompt_token_ids(prompt, self.manifest.vocab_size, self.encode)

    def default_params(self, **overrides) -> SamplingParams:
        """The SamplingParams used when params is None: the model's generation config, with `overrides` on top.

        fastllm.json's `generation` holds the source's Hugging Face generation_config (do_sample, temperature,
        top_k, top_p, repetition_penalty): do_sample false or absent is greedy, fields it does not set keep
        SamplingParams' defaults (see SamplingParams.from_generation_config).
        """
        try:
            params = SamplingParams.from_generation_config(self.manifest.generation or {})
        except InvalidParameterError as e:
            raise ManifestError(f"fastllm.json's generation config {self.manifest.generation} is not usable ({e}); "
                                f"pass params explicitly, or fix `generation` in {self.directory / 'fastllm.json'}"
                                ) from None
        return params.replace(**overrides) if overrides else params

    # -- the one decode loop ----------------------------------------------------------------------------------
    def _decode(self, prompts: list[list[int]], params: SamplingParams, *,
                detokenize: bool = True) -> Iterator[list[Sequence]]:
        """Prefill all prompts (padded to one width as the graph's cache lays them out), then decode one token per row
        per step.

        Yields the sequences after every step; stops when every row has finished. detokenize=False keeps no text
        (stop strings then need it: tokens() asks for it only when there are some).
        """
        self._check_fits(prompts, params)
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError(f"stop strings {list(params.stop)} need a tokenizer and {self.directory} has "
                                        "none; use stop_token_ids instead")
        batch, width = len(prompts), max(len(p) for p in prompts)
        sequences = [Sequence(p, params, self, None if params.seed is None else params.seed + i, detokenize)
                     for i, p in enumerate(prompts)]
        if params.prompt_logprobs is not None:  # a scoring pass of its own: the prefill below keeps the last logits
            for seq, score in zip(sequences, score_ids(self, prompts, top_logprobs=params.prompt_logprobs)):
                seq.prompt_logprobs = (None, *score.token_logprobs())
        sampler = Sampler(self.manifest.vocab_size)  # its scratch is this request's, allocated once
        rngs, histories = [s.rng for s in sequences], [s.history for s in sequences]
        pad = self.manifest.pad_token_id if self.manifest.pad_token_id is not None else 0
        cache = self.session.new_cache(batch, width, params.max_new_tokens)
        binding = self.session.ort.io_binding()
        logits = np.empty((batch, 1, self.manifest.vocab_size), dtype=np.float32)  # (B, 1, V), reused every step
        next_ids = np.full((batch, 1), pad, dtype=np.int64)
        try:
            for feeds in cache.prefill_steps(prompts, pad, PREFILL_CHUNK):
                self.session.forward(cache, binding, feeds, out=logits)
            for step in range(params.max_new_tokens):
                rows = [row for row, seq in enumerate(sequences) if seq.finish_reason is None]
                ids, logprobs = sampler.sample(logits[:, -1], params, rngs, histories, rows=rows)
                for row, token, logprob in zip(rows, ids.tolist(), logprobs):
                    next_ids[row, 0] = token
                    sequences[row].append(token, logprob)
                yield sequences
                if all(s.finish_reason is not None for s in sequences):
                    return
                self.session.forward(cache, binding, cache.decode(next_ids), out=logits)
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    # -- helpers ----------------------------------------------------------------------------------------------
    def _params(self, params) -> SamplingParams:
        return self.default_params() if params is None else as_params(params)

    def _check_fits(self, prompts: list[list[int]], params: SamplingParams) -> None:
        limit = self.manifest.max_context
        for i, ids in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if len(ids) >= limit:
                raise ContextLengthError(f"{name} has {len(ids)} tokens but the model's context is {limit} tokens; "
                                         f"shorten it to at most {limit - 1} tokens")
            if len(ids) + params.max_new_tokens > limit:
                raise ContextLengthError(
                    f"{name} ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                    f"context of {limit} tokens; set max_new_tokens <= {limit - len(ids)} or shorten the prompt")

    def _completion(self, seq: Sequence, start: float, first: float | None, last: float | None) -> Completion:
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
        )


# -- prompts ------------------------------------------------------------------------------------------------------
ONE_PROMPT = "a string, a list of token ids or a 1-D integer numpy array"


def prompt_token_ids(prompt, vocab_size: int, encode: Callable[[str], list[int]]) -> tuple[list[list[int]], bool]:
    """Token ids per prompt, and whether `prompt` was one prompt.

    One prompt: a str (encoded with `encode`), a list or tuple of int token ids, or a 1-D integer array.
    A batch: a list or tuple of those, or a 2-D integer array of shape (batch, seq), (1, seq) included.
    Anything else, text that is not valid Unicode, an empty prompt or an id outside [0, vocab_size) is an
    InvalidPromptError naming the prompt and what to change.
    """
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
        _check_id_array(prompt, "prompt")
        rows, single = list(prompt), False
    elif isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):
        rows, single = list(prompt), False
    else:
        rows, single = [prompt], True
    encoded = []
    for i, row in enumerate(rows):
        name = "prompt" if single else f"prompt {i}"
        ids = _one_prompt(row, name, encode)
        bad = [(at, t) for at, t in enumerate(ids) if not 0 <= t < vocab_size]
        if bad:
            raise InvalidPromptError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): "
                                     f"{[t for _, t in bad[:5]]} at positions {[at for at, _ in bad[:5]]}; "
                                     "use ids of this model's tokenizer")
        encoded.append(ids)
    return encoded, single


def _one_prompt(prompt, name: str, encode: Callable[[str], list[int]]) -> list[int]:
    if isinstance(prompt, str):
        _check_nonempty(prompt, name)
        _check_text(prompt, name)
        ids = encode(prompt)
        if not ids:
            raise InvalidPromptError(f"{name} {prompt!r} encodes to no tokens; give some text or token ids")
        return ids
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:
            raise InvalidPromptError(f"{name} is an array of shape {prompt.shape}; one prompt is 1-D (seq,), a batch "
                                     "is one 2-D array (batch, seq) or a list of 1-D prompts")
        _check_id_array(prompt, name)
        return prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        _check_nonempty(prompt, name)
        for at, t in enumerate(prompt):
            if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_)):
                raise InvalidPromptError(f"{name} has {t!r} of type {type(t).__name__} at position {at}; token ids "
                                         "are integers")
        return [int(t) for t in prompt]
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidPromptError(f"{name} is {type(prompt).__name__}; decode it to str first "
                                 "(prompt.decode('utf-8')) or pass token ids")
    raise InvalidPromptError(f"{name} must be {ONE_PROMPT} (a batch: a list of those, or a 2-D integer array); "
                             f"got {type(prompt).__name__}")


def _check_nonempty(prompt, name: str) -> None:
    if len(prompt) == 0:
        raise InvalidPromptError(f"{name} is empty; give at least one character or token id")


def _check_id_array(ids: np.ndarray, name: str) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidPromptError(f"{name} is an array of {ids.dtype}; token ids must be an integer array "
                                 "(e.g. np.int64)")
    if ids.size == 0:
        raise InvalidPromptError(f"{name} is an empty array of shape {ids.shape}; give at least one token id")


def _check_text(text: str, name: str) -> None:
    """Refuse text that cannot be UTF-8 encoded (lone surrogates, e.g. undecodable bytes of sys.argv).

    Replacing them would silently change the prompt.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidPromptError(
            f"{name} is not valid Unicode: {text[e.start]!r} at character {e.start} is a lone surrogate (often a "
            "byte that was not UTF-8, e.g. in a command-line argument or a file read with errors='surrogateescape'); "
            "give the text as UTF-8 or pass token ids") from None


def load(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None) -> Engine:
    """Open a model directory written by `fastllm export`."""
    directory = Path(path)
    where = Device.parse(device)
    manifest = Manifest.read(directory)
    session = Session(directory, manifest, device=where, threads=threads)
    tokenizer = None
    if manifest.tokenizer:
        tok_path = directory / manifest.tokenizer
        if not tok_path.is_file():
            raise ModelLoadError(f"{tok_path} is missing; the model directory is incomplete, re-export it")
        tokenizer = Tokenizer(tok_path)
    return Engine(directory, manifest, session, tokenizer)

"""The engine: load a model directory, then generate or stream. Both wrap one decode loop."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastllm.errors import ContextLengthError, InvalidPromptError, ModelLoadError
from fastllm.manifest import Manifest
from fastllm.sampler import SamplingParams, TokenHistory, sample
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

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.total_s if self.total_s > 0 else float("inf")


class Sequence:
    """One row of a request: its tokens, its text so far and why it finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, engine: Engine, seed: int | None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.history = TokenHistory(engine.manifest.vocab_size, prompt_ids)
        self.rng = np.random.default_rng(seed)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.manifest.eos_token_ids))
        self.detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids) if engine.tokenizer else None
        self.text = ""
        self.streamed = 0  # characters of text handed to a stream
        self.finish_reason: str | None = None

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.history.add(token)
        if token in self.stop_ids:  # the ending id is kept in token_ids, not in the text
            self.finish_reason = "stop"
        elif self.detok is not None:
            self.text += self.detok.add(token)
            if self._cut_at_stop_string():
                return
        if self.finish_reason is None and len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            self.text += self.detok.flush()
            self._cut_at_stop_string()

    def _cut_at_stop_string(self) -> bool:
        hits = [at for at in (self.text.find(s) for s in self.params.stop) if at >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
        return bool(hits)

    def streamable(self) -> str:
        """New text that can no longer turn into a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            for stop in self.params.stop:  # hold back a tail that may be the start of a stop string
                for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if stop.startswith(self.text[-n:]):
                        end = min(end, len(self.text) - n)
                        break
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
    def generate(self, prompt, params: SamplingParams | None = None) -> Completion | list[Completion]:
        """A prompt (text or token ids) gives a Completion; a list of prompts gives a list, in order."""
        prompts, single = self._encode(prompt)
        params = params or SamplingParams()
        start = time.perf_counter()
        first = last = None
        sequences: list[Sequence] = []
        for sequences in self._decode(prompts, params):
            last = time.perf_counter()
            first = first or last
        completions = [self._completion(s, start, first, last) for s in sequences]
        return completions[0] if single else completions

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text pieces of one prompt as they decode. Closing the iterator early ends the request."""
        prompts, single = self._encode(prompt)
        if not single:
            raise InvalidPromptError("stream() takes one prompt; use generate() for a list of prompts")
        for (sequence,) in self._decode(prompts, params or SamplingParams()):
            piece = sequence.streamable()
            if piece:
                yield piece

    def tokens(self, prompt, params: SamplingParams | None = None) -> Iterator[tuple[int | None, ...]]:
        """The decode loop at token level: after each step, the new id of every prompt (None once it finished)."""
        prompts, _ = self._encode(prompt)
        counts = [0] * len(prompts)
        for sequences in self._decode(prompts, params or SamplingParams()):
            step = []
            for row, seq in enumerate(sequences):
                fresh = len(seq.token_ids) > counts[row]
                counts[row] = len(seq.token_ids)
                step.append(seq.token_ids[-1] if fresh else None)
            yield tuple(step)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidPromptError(f"{self.directory} has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    # -- the one decode loop ----------------------------------------------------------------------------------
    def _decode(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[Sequence]]:
        """Prefill all prompts (padded to one width as the graph's cache lays them out), then decode one token per row
        per step.

        Yields the sequences after every step; stops when every row has finished.
        """
        self._check_fits(prompts, params)
        batch, width = len(prompts), max(len(p) for p in prompts)
        sequences = [Sequence(p, params, self, None if params.seed is None else params.seed + i)
                     for i, p in enumerate(prompts)]
        pad = self.manifest.pad_token_id if self.manifest.pad_token_id is not None else 0
        cache = self.session.new_cache(batch, width, params.max_new_tokens)
        binding = self.session.ort.io_binding()
        logits = np.empty((batch, 1, self.manifest.vocab_size), dtype=np.float32)  # (B, 1, V), reused every step
        next_ids = np.full((batch, 1), pad, dtype=np.int64)
        try:
            for feeds in cache.prefill_steps(prompts, pad, PREFILL_CHUNK):
                self.session.forward(cache, binding, feeds, out=logits)
            for step in range(params.max_new_tokens):
                for row, seq in enumerate(sequences):
                    if seq.finish_reason is None:
                        next_ids[row, 0] = sample(logits[row, -1], params, seq.rng, seq.history)
                        seq.append(int(next_ids[row, 0]))
                yield sequences
                if all(s.finish_reason is not None for s in sequences):
                    return
                self.session.forward(cache, binding, cache.decode(next_ids), out=logits)
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    # -- helpers ----------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str) or _is_id_list(prompt):
            single, prompts = True, [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) or _is_id_list(p) for p in prompt):
            single, prompts = False, list(prompt)
        else:
            raise InvalidPromptError(f"prompt must be a string, a list of token ids, or a non-empty list of those; "
                                     f"got {type(prompt).__name__}")
        encoded = []
        for i, p in enumerate(prompts):
            name = "prompt" if single else f"prompt {i}"
            if len(p) == 0:
                raise InvalidPromptError(f"{name} is empty; give at least one character or token id")
            ids = self.encode(p) if isinstance(p, str) else [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < self.manifest.vocab_size]
            if bad:
                raise InvalidPromptError(f"{name} has token ids outside the vocabulary [0, "
                                         f"{self.manifest.vocab_size}): {bad[:5]}")
            encoded.append(ids)
        return encoded, single

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
        )


def _is_id_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value)


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

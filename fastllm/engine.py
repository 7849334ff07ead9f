"""The engine: load a model directory, then submit requests, or generate, stream or step through tokens.

Every request goes through one background loop per engine (fastllm.scheduler): on the fused graph it decodes all
live requests together in slots of one shared KV buffer; on the portable graph it runs them one at a time.
generate / stream / steps / tokens are thin wrappers over submit.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from fastllm.errors import ContextLengthError, InvalidParameterError, InvalidPromptError, ManifestError, ModelLoadError
from fastllm.manifest import Manifest
from fastllm.sampler import SamplingParams, as_params
from fastllm.scheduler import PREFILL_CHUNK, Layout, Request, Scheduler, SerialScheduler
from fastllm.score import score_ids
from fastllm.sequence import Completion, Sequence, Step, StopStrings
from fastllm.session import Device, Session
from fastllm.tokenizer import Tokenizer

__all__ = ["PREFILL_CHUNK", "Completion", "Engine", "Request", "Step", "StopStrings", "load", "prompt_token_ids"]

MAX_QUEUE = 256  # default bound on requests waiting for a slot (submit() past it: QueueFullError)


class Engine:
    """A loaded model. Safe to share between threads and event loops: requests from anywhere go to one loop.

    Serving options (fused graph): `slots` requests decode at once, each in a slot of `context` positions (default
    the model's context); `kv_memory` (bytes) sizes the slot count instead; by default the KV buffer takes a quarter
    of the memory available at start, at most 16 slots. Up to `max_queue` further requests wait (FIFO) for a slot;
    past that, submit() raises QueueFullError at once (generate/stream/steps/tokens never do: they wait).
    `prefill_chunk` prompt positions are prefilled per loop step; `prefix_cache` keeps finished prompts' KV in their
    slots for reuse. The KV buffer is allocated once, when the first request arrives. `speculative` turns on
    prompt-lookup speculative decoding while one request runs alone (fastllm.speculative): the same tokens as
    plain decoding, greedy or sampled, several per step where the text repeats what it has seen.
    """

    def __init__(self, directory: Path, manifest: Manifest, session: Session, tokenizer: Tokenizer | None, *,
                 slots: int | None = None, context: int | None = None, kv_memory: int | None = None,
                 max_queue: int | None = MAX_QUEUE, prefill_chunk: int | None = None, prefix_cache: bool = True,
                 speculative: bool = False):
        self.directory = directory
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        if max_queue is not None and (not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0):
            raise InvalidParameterError(f"max_queue must be an integer >= 0 or None (no bound), got {max_queue!r}")
        if not isinstance(prefix_cache, bool):
            raise InvalidParameterError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        if not isinstance(speculative, bool):
            raise InvalidParameterError(f"speculative must be True or False, got {speculative!r}")
        if speculative and manifest.graph.kind != "fused":
            raise InvalidParameterError("speculative decoding needs the fused graph (one shared KV buffer); this "
                                        f"model was exported with graph={manifest.graph.kind!r}: re-export it with "
                                        "--graph fused, or load it with speculative=False")
        if manifest.graph.kind == "fused":
            self.layout = Layout(manifest, session.device, slots=slots, context=context, kv_memory=kv_memory,
                                 prefill_chunk=prefill_chunk)
            self._scheduler = Scheduler(session, manifest, tokenizer, self.layout, max_queue=max_queue,
                                        prefix_cache=prefix_cache, speculative=speculative)
        else:  # the concatenating graph cannot share one buffer between rows: one request at a time
            self.layout = None
            self._scheduler = SerialScheduler(session, manifest, tokenizer, max_queue=max_queue)
        self.context = self.layout.context if self.layout else manifest.max_context
        self._chat_template = None
        weakref.finalize(self, self._scheduler.stop, False)

    # -- requests ---------------------------------------------------------------------------------------------
    def submit(self, prompt, params: SamplingParams | Mapping | None = None) -> Request:
        """Queue one prompt (text or token ids) and return its Request at once: iterate it (or `async for`) for
        its Steps, cancel() it, or wait for its Completion with result() / `await request.wait()`.

        Bad input raises here (InvalidPromptError, InvalidParameterError, ContextLengthError), as does a full
        queue: QueueFullError when max_queue requests already wait for a slot. Never blocks.
        """
        prompts, single = self.prompt_ids(prompt)
        if not single:
            raise InvalidPromptError("submit() takes one prompt; submit each prompt of a batch on its own "
                                     "(or use generate() for a list)")
        return self._submit(prompts, self._params(params), internal=False)[0]

    def _submit(self, prompts: list[list[int]], params: SamplingParams, *, internal: bool = True,
                detokenize: bool = True) -> list[Request]:
        """Requests for prompts; with a seed, prompt i samples with seed + i."""
        self._check_fits(prompts, params)
        vocab = self.manifest.vocab_size
        outside = [t for t, _ in params.logit_bias if t >= vocab] + [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise InvalidParameterError(f"token ids {outside[:5]} in logit_bias / stop_token_ids are outside the "
                                        f"vocabulary [0, {vocab}); use ids of this model's tokenizer")
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError(f"stop strings {list(params.stop)} need a tokenizer and {self.directory} has "
                                        "none; use stop_token_ids instead")
        sequences = [Sequence(p, params, self.manifest, self.tokenizer,
                              None if params.seed is None else params.seed + i, detokenize)
                     for i, p in enumerate(prompts)]
        if params.prompt_logprobs is not None:  # a scoring pass of its own, here in the caller's thread
            for seq, score in zip(sequences, score_ids(self, prompts, top_logprobs=params.prompt_logprobs)):
                seq.prompt_logprobs = (None, *score.token_logprobs())
        requests = [Request(self._scheduler, seq, internal=internal) for seq in sequences]
        for request in requests:
            self._scheduler.submit(request)
        return requests

    def stats(self) -> dict:
        """What the loop is doing: slots, slots_in_use, running, waiting, prefilling, and cumulative counters
        (prefix_cache_hits, prefix_cached_tokens, requests_finished, prompt_tokens, generated_tokens)."""
        return self._scheduler.stats()

    def close(self) -> None:
        """Stop the loop: requests not finished end with finish_reason "cancelled"; submit() then raises."""
        self._scheduler.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the wrappers over submit -----------------------------------------------------------------------------
    def generate(self, prompt, params: SamplingParams | Mapping | None = None) -> Completion | list[Completion]:
        """A prompt (text or token ids) gives a Completion; a batch of prompts gives a list, in order.

        prompt: one prompt is a str, a list of token ids or a 1-D integer numpy array; a batch is a list of those or
        a 2-D integer array (batch, seq) (see prompt_token_ids). params: a SamplingParams, a dict of its fields, or
        None for default_params(), the model's generation config. The same holds for stream() and tokens().
        Prompt + max_new_tokens beyond the context is a ContextLengthError (no clamping here). With a seed, prompt
        i of a batch samples with seed + i.
        """
        prompts, single = self.prompt_ids(prompt)
        requests = self._submit(prompts, self._params(params))
        try:
            completions = [r.result() for r in requests]
        finally:
            for r in requests:
                r.cancel()
        return completions[0] if single else completions

    def stream(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[str]:
        """Yields text pieces of one prompt as they decode. Closing the iterator early ends the request."""
        prompts, single = self.prompt_ids(prompt)
        if not single:
            raise InvalidPromptError("stream() takes one prompt; use generate() for a list of prompts")
        (request,) = self._submit(prompts, self._params(params))
        try:
            for step in request:
                if step.text:
                    yield step.text
        finally:
            request.cancel()

    def steps(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[tuple[Step | None, ...]]:
        """Token by token, with everything a server streams: per round, a Step for every prompt (None once it
        finished) with the new id, the text that became final, its logprob when params.logprobs is set, the
        finish reason on the last one, and on the first one the prompt's logprobs when params.prompt_logprobs is
        set. The text of a prompt's steps joins to its Completion.text. Closing the iterator ends the requests.
        """
        prompts, _ = self.prompt_ids(prompt)
        yield from _lockstep(self._submit(prompts, self._params(params)), lambda step: step)

    def tokens(self, prompt, params: SamplingParams | Mapping | None = None) -> Iterator[tuple[int | None, ...]]:
        """Token ids only: per round, the new id of every prompt (None once it finished).

        Nothing is detokenized, unless params has stop strings: those are matched on the text, so only then is it
        decoded, and the ids end where generate()'s would. Logprobs and text per token: steps().
        """
        prompts, _ = self.prompt_ids(prompt)
        params = self._params(params)
        yield from _lockstep(self._submit(prompts, params, detokenize=bool(params.stop)),
                             lambda step: step.token_id)

    # -- chat -------------------------------------------------------------------------------------------------
    def chat(self, messages, params: SamplingParams | Mapping | None = None, *, template=None,
             **template_kwargs) -> Completion:
        """The assistant's reply to `messages` (OpenAI-style [{"role": ..., "content": ...}, ...]): the model's
        chat template renders them with the generation prompt (as transformers' apply_chat_template does), then
        generate(). template: a fastllm.chat.ChatTemplate, a file or the template text, instead of the model's.
        template_kwargs (e.g. tools=[...]) go to the template. A model without a template: NoChatTemplateError.
        """
        return self.generate(self.chat_prompt(messages, template=template, **template_kwargs), params)

    def chat_prompt(self, messages, *, template=None, add_generation_prompt: bool = True,
                    **template_kwargs) -> list[int]:
        """The token ids chat() generates from. The rendered text holds its special tokens (the template writes
        bos_token itself), so it is encoded without adding any: no double BOS."""
        from fastllm.chat import ChatTemplate, chat_template

        if not isinstance(template, ChatTemplate):
            if template is None and self._chat_template is None:
                self._chat_template = chat_template(self.directory)  # read once
            template = self._chat_template if template is None else chat_template(self.directory, template)
        text = template.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    # -- text, scoring, parameters ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidPromptError(f"{self.directory} has no tokenizer; pass token ids instead of text")
        _check_text(text, "text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def score(self, prompt, *, top_logprobs: int = 0, window: int | None = None, stride: int | None = None):
        """The log-probability of each prompt token after the first under the model, optionally with the
        `top_logprobs` most likely alternatives at each position: a fastllm.score.Score (arrays, sum, mean,
        perplexity) for one prompt, a list for a batch (prompts as generate() takes them; see prompt_token_ids).

        Computed from the raw logits (no temperature or penalties), log-softmax in float64. A prompt longer than the
        context (+1: its last token is only predicted) is a ContextLengthError unless `window` asks to score it in
        windows of that many tokens every `stride` (see fastllm.score.score_ids).
        """
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

    # -- helpers ----------------------------------------------------------------------------------------------
    def _params(self, params) -> SamplingParams:
        return self.default_params() if params is None else as_params(params)

    def _check_fits(self, prompts: list[list[int]], params: SamplingParams) -> None:
        limit = self.context
        what = "the model's context" if limit == self.manifest.max_context else "the engine's slot context"
        for i, ids in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if len(ids) >= limit:
                raise ContextLengthError(f"{name} has {len(ids)} tokens but {what} is {limit} tokens; "
                                         f"shorten it to at most {limit - 1} tokens")
            if len(ids) + params.max_new_tokens > limit:
                raise ContextLengthError(
                    f"{name} ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds {what} of "
                    f"{limit} tokens; set max_new_tokens <= {limit - len(ids)} or shorten the prompt")


def _lockstep(requests: list[Request], pick: Callable) -> Iterator[tuple]:
    """Rounds over requests that decode together: per round, pick(step) of each request's next Step, None for one
    that finished. Closing the iterator cancels the requests."""
    iterators = [iter(r) for r in requests]
    live = [True] * len(requests)
    try:
        while any(live):
            out = []
            for row, it in enumerate(iterators):
                step = next(it, None) if live[row] else None
                if step is None or step.finish_reason is not None:
                    live[row] = False
                out.append(None if step is None else pick(step))
            yield tuple(out)
    finally:
        for r in requests:
            r.cancel()


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


def load(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None, slots: int | None = None,
         context: int | None = None, kv_memory: int | None = None, max_queue: int | None = MAX_QUEUE,
         prefill_chunk: int | None = None, prefix_cache: bool = True, speculative: bool = False) -> Engine:
    """Open a model directory written by `fastllm export`. The serving options are Engine's (see its docstring)."""
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
    return Engine(directory, manifest, session, tokenizer, slots=slots, context=context, kv_memory=kv_memory,
                  max_queue=max_queue, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache,
                  speculative=speculative)

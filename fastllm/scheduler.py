"""Continuous batching: one background loop per engine owns the session and runs every live request together.

The KV cache is one buffer per layer and kind, (slots, kv_heads, context, head_dim), allocated once when the loop
starts. A request owns one slot (one contiguous block of that buffer) from admission to finish; the rest wait in a
FIFO queue. Each loop step is

  1. one decode forward over slots [0, hi), hi = 1 + the highest slot that is decoding: every decoding row adds
     its last token at its own position (GroupQueryAttention's seqlens_k per row). Rows below hi that are not
     decoding (free, prefilling or holding a cached prompt) run a harmless dummy token at a position that is not
     kept (see Slot.spare);
  2. then at most one prefill chunk of one request (a batch-1 step bound to a view of its slot; GroupQueryAttention
     takes a multi-token step after a past only for a batch of one), so a long prompt delays the others by one
     chunk per step.

Views of a slot are bound by device pointer and shape (IOBinding.bind_input / bind_output), the same code on the
CPU and CUDA: nothing is copied to run a slot, and nothing is allocated per token.

Prefix reuse: a slot keeps the prompt it prefilled after its request ends (an LRU within the slot budget). A new
prompt that starts with `n` tokens held by a slot (finished or still live) skips them: it takes over a finished
slot as it is, or (CPU) has those positions copied from a live one. `n` is a multiple of the prefill chunk and
prefill chunks always start at multiples of the chunk size, so a hit repeats exactly the arithmetic of a miss
and greedy output does not depend on the cache. Only prompt positions are reused (positions written by decode
steps were computed in a different batch shape).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from fastllm.errors import FastLLMError, InvalidParameterError, QueueFullError
from fastllm.sampler import Sampler
from fastllm.sequence import Sequence, Step, completion
from fastllm.speculative import DRAFT_MAX, PromptLookup
from fastllm.session import ort  # through fastllm.session: its import says how to install ONNX Runtime

if TYPE_CHECKING:
    from fastllm.manifest import Manifest
    from fastllm.session import Session

# Prompt positions per prefill step. Measured on smollm2-135m, 2 threads (bench/results/2026-11-24/steps-a): the
# cost per prompt token is flat from 64 to 256 (fp32 1.18-1.23 ms, int8 0.80-0.82, int4 1.05-1.10) and 30% worse
# at 512, while the decode rows of other requests wait one chunk per step (fp32: 79 ms at 64, 152 at 128, 303 at
# 256). 128 keeps that wait at half of 256's for the same prefill cost; it is also the prefix cache's granularity.
PREFILL_CHUNK = 128
MAX_SLOTS = 16  # default cap on slots: beyond it a decode step over 2 cores gains little
KV_SHARE = 0.25  # default KV budget: this share of the memory available at start
_KEEP_ONE = np.array(1, dtype=np.int64)
# cumulative counters in stats(); decode_rows / decode_steps is the mean batch of the decode steps, decode_rows_run
# the rows those steps ran (the span of the running slots, idle slots inside it included)
# speculative_steps / drafted_tokens / accepted_tokens: the verify steps of speculative decoding, the tokens they
# drafted and the drafted tokens kept
COUNTERS = ("prefix_cache_hits", "prefix_cached_tokens", "requests_finished", "prompt_tokens", "generated_tokens",
            "decode_steps", "decode_rows", "decode_rows_run", "speculative_steps", "drafted_tokens",
            "accepted_tokens")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations on this host (Linux /proc/meminfo), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Layout:
    """How many slots of how many positions: from slots, context and kv_memory as fastllm.load takes them."""

    def __init__(self, manifest, device, *, slots: int | None, context: int | None, kv_memory: int | None,
                 prefill_chunk: int | None):
        for name, value in (("slots", slots), ("context", context), ("kv_memory", kv_memory),
                            ("prefill_chunk", prefill_chunk)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidParameterError(f"{name} must be a positive integer or None, got {value!r}")
        if slots is not None and kv_memory is not None:
            raise InvalidParameterError("give slots or kv_memory, not both: kv_memory decides the slot count "
                                        "(kv_memory // bytes per slot)")
        self.chunk = prefill_chunk or PREFILL_CHUNK
        limit = manifest.max_context
        if context is not None and context > limit:
            raise InvalidParameterError(f"context {context} is more than the model's context of {limit} tokens; "
                                        f"pass context <= {limit}")
        self.context = context or limit
        itemsize = np.dtype(manifest.kv_dtype).itemsize
        self.slot_bytes = 2 * manifest.num_layers * manifest.num_kv_heads * self.context * manifest.head_dim * itemsize
        if slots is None:
            budget = kv_memory
            if budget is None:
                free = available_memory() if device.kind == "cpu" else None
                budget = int(free * KV_SHARE) if free else MAX_SLOTS // 4 * self.slot_bytes
                slots = max(1, min(MAX_SLOTS, budget // self.slot_bytes))
            else:
                slots = budget // self.slot_bytes
                if slots < 1:
                    raise InvalidParameterError(
                        f"kv_memory {kv_memory} bytes holds no slot: one slot of {self.context} positions takes "
                        f"{self.slot_bytes} bytes; raise kv_memory or lower context")
        self.slots = slots

    @property
    def kv_bytes(self) -> int:
        return self.slots * self.slot_bytes


class Slot:
    """One row of the shared KV buffer and what it holds."""

    def __init__(self, index: int):
        self.index = index
        self.request: Request | None = None  # the request using it (prefilling or decoding)
        self.prompt: list[int] = []  # the prompt ids whose KV it holds, positions [0, reusable) valid
        self.reusable = 0  # leading prompt positions that are prefilled: a multiple of the chunk
        self.length = 0  # positions written for the request (prompt + generated)
        self.released = 0.0  # when its request ended (LRU order of cached prompts)

    @property
    def spare(self) -> int:
        """A position a dummy decode row may write: one no held or live position uses (the next to be written)."""
        return self.length if self.request is not None else self.reusable

    def common(self, ids: list[int]) -> int:
        n = min(self.reusable, len(ids))
        if n == 0:
            return 0
        a = np.asarray(self.prompt[:n])
        b = np.asarray(ids[:n])
        differ = np.flatnonzero(a != b)
        return int(differ[0]) if differ.size else n


class Request:
    """A submitted prompt: iterate it for its Steps (from a thread or, with `async for`, an event loop), cancel()
    it, or wait for its Completion with result() / await wait()."""

    _ids = itertools.count()

    def __init__(self, scheduler: Loop, sequence: Sequence, *, internal: bool = False):
        self.id = f"req-{next(Request._ids)}"
        self.sequence = sequence
        self.prompt_ids = sequence.prompt_ids
        self.params = sequence.params
        self.cached_tokens = 0
        self.submitted = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self._scheduler = scheduler
        self._steps: list[Step] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._finished = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._completion = None
        self.internal = internal  # submitted by generate()/stream(): not counted against the queue bound
        self.drafter: PromptLookup | None = None  # its prompt-lookup drafts, when the engine speculates

    # -- consumer side ------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """End the request: its slot is freed at the engine's next step. Safe from any thread, any number of times."""
        if not self._finished and not self._cancelled:
            self._cancelled = True
            self._scheduler.wake()

    def __iter__(self) -> Iterator[Step]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._steps) and not self._finished:
                    self._cond.wait()
                fresh, finished = self._steps[i:], self._finished
            i += len(fresh)
            yield from fresh
            if finished and i >= len(self._steps):
                if self._error is not None:
                    raise self._error
                return

    async def __aiter__(self):
        i = 0
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                fresh, finished = self._steps[i:], self._finished
                if not fresh and not finished:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            if not fresh and not finished:
                await future
                continue
            i += len(fresh)
            for step in fresh:
                yield step
            if finished and i >= len(self._steps):
                if self._error is not None:
                    raise self._error
                return

    def result(self, timeout: float | None = None):
        """The Completion, once finished (blocks; TimeoutError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._finished, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion

    async def wait(self):
        """The Completion, once finished, from an event loop."""
        async for _ in self:
            pass
        return self.result()

    # -- scheduler side -----------------------------------------------------------------------------------------
    def _push(self, step: Step | None, *, finish: bool = False, error: BaseException | None = None) -> None:
        with self._cond:
            if step is not None:
                self._steps.append(step)
            if finish:
                self._error = error
                self._completion = None if error else completion(self.sequence, self.submitted, self.first,
                                                                 self.last, self.cached_tokens)
                self._finished = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class SlotBuffers:
    """The shared KV buffers on the session's device and the bindings that run views of them."""

    def __init__(self, session, layout: Layout):
        manifest, device = session.manifest, session.device
        self.session, self.manifest, self.device = session, manifest, device
        self.layout = layout
        self.dtype = np.dtype(manifest.kv_dtype)
        shape = (layout.slots, manifest.num_kv_heads, layout.context, manifest.head_dim)
        # (slots, kv_heads, context, head_dim) per layer and kind, allocated once; on the CPU backed by numpy
        # (zero-filled pages the OS maps as they are first written), elsewhere by ORT's allocator on the device
        if device.kind == "cpu":
            self.host = [np.zeros(shape, self.dtype) for _ in range(2 * manifest.num_layers)]
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.host]
        else:
            self.host = None
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device.kind, device.index)
                           for _ in range(2 * manifest.num_layers)]
        self.pointers = [v.data_ptr() for v in self.values]
        self.slot_stride = manifest.num_kv_heads * layout.context * manifest.head_dim * self.dtype.itemsize
        self.names = [name for layer in range(manifest.num_layers)
                      for name in zip(manifest.past_names(layer), manifest.present_names(layer))]

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Bind slots [first, first + count) as past and present of every layer."""
        shape = (count, self.manifest.num_kv_heads, self.layout.context, self.manifest.head_dim)
        kind, index = self.device.kind, self.device.index
        for (past, present), pointer in zip(self.names, self.pointers):
            at = pointer + first * self.slot_stride
            binding.bind_input(past, kind, index, self.dtype, shape, at)
            binding.bind_output(present, kind, index, self.dtype, shape, at)

    def copy(self, src: int, dst: int, positions: int) -> bool:
        """Copy positions [0, positions) of slot src into slot dst; False where the device cannot (CUDA: reuse
        then only takes over finished slots, which needs no copy)."""
        if self.host is None:
            return False
        for a in self.host:
            a[dst, :, :positions] = a[src, :, :positions]
        return True


class Loop:
    """What both loops share: the inbox callers submit to, the thread, the queue bound, stop and counters."""

    def __init__(self, session: Session, manifest: Manifest, tokenizer, *, max_queue: int | None):
        self.session, self.manifest, self.tokenizer = session, manifest, tokenizer
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque[Request] = collections.deque()  # submitted, not yet seen by the loop
        self._waiting: collections.deque[Request] = collections.deque()  # seen, waiting for a slot (FIFO)
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.counters = collections.Counter()

    # -- callers ------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        with self._lock:
            if self._stopped:
                raise FastLLMError("the engine is closed; load the model again")
            if not request.internal and self.max_queue is not None:
                waiting = sum(not r.internal for r in itertools.chain(self._inbox, self._waiting))
                if waiting >= self.max_queue:
                    raise QueueFullError(f"{waiting} requests are already waiting for a slot (max_queue="
                                         f"{self.max_queue}); retry later, or raise the bound or the slots "
                                         "(fastllm.load(..., max_queue=N, slots=N), fastllm serve --max-queue N "
                                         "--slots N)")
            self._inbox.append(request)
            self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._thread_main, name="fastllm-loop", daemon=True)
                self._thread.start()
                _LIVE.add(self)
        return request

    def wake(self) -> None:
        with self._lock:
            self._wake.notify()

    def stop(self, join: bool = True) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._inbox) + len(self._waiting)
        return {"slots": self.slot_count, "slots_in_use": self.slots_in_use(), "running": self.running_count(),
                "waiting": waiting, "prefilling": self.prefilling_count(),
                **{name: self.counters[name] for name in COUNTERS}}

    # -- the thread ---------------------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            self._start()
        except Exception as e:  # e.g. the KV buffer does not fit: every request gets the error
            error = FastLLMError(f"the engine could not start ({type(e).__name__}: {e}); load it with fewer "
                                 "slots or a smaller context")
            with self._lock:
                self._stopped = True
                pending = list(self._inbox)
                self._inbox.clear()
            for request in pending:
                request._push(None, finish=True, error=error)
            return
        while True:
            try:
                if not self._loop():
                    break
            except Exception as e:  # a failure mid-step (e.g. ORT): fail the requests it touched, keep serving
                self._fail_all(e)
        self._close()

    def _take_inbox(self) -> bool:
        """Wait until there is work (the subclass says what counts) or a stop; move the inbox to waiting.
        Returns False when stopped."""
        with self._lock:
            while not self._stopped and not self._inbox and not self._has_work():
                self._wake.wait()
            if self._stopped:
                return False
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        return True

    def _finish(self, request: Request, reason: str | None, error: BaseException | None = None) -> None:
        if reason == "cancelled":
            request.sequence.finish_reason = "cancelled"
            request._push(Step(None, "", None, "cancelled"), finish=True)
        else:
            request._push(None, finish=True, error=error)
        self.counters["requests_finished"] += 1

    def _close(self) -> None:
        with self._lock:
            pending = list(self._inbox) + list(self._waiting)
            self._inbox.clear()
            self._waiting.clear()
        for request in pending + self._active():
            self._release(request)
            self._finish(request, "cancelled")

    def _fail_all(self, error: BaseException) -> None:
        for request in self._active():
            self._release(request)
            self._finish(request, None, error)

    def _emit(self, request: Request, token: int, logprob) -> bool:
        """Hand a new token to its request; True when that ended the request."""
        seq = request.sequence
        first = not seq.token_ids
        seq.append(token, logprob)
        if request.drafter is not None:
            request.drafter.add(token)
        now = time.perf_counter()
        request.first = request.first or now
        request.last = now
        self.counters["generated_tokens"] += 1
        step = Step(token, seq.streamable() if seq.detok is not None else "",
                    None if seq.logprobs is None else seq.logprobs[-1], seq.finish_reason,
                    seq.prompt_logprobs if first else None)
        request._push(step)
        return seq.finish_reason is not None


_LIVE: weakref.WeakSet[Loop] = weakref.WeakSet()  # loops whose thread started


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, let every loop finish its step and end: a daemon thread still inside an ONNX Runtime run
    while the process tears ORT down aborts it ("terminate called without an active exception")."""
    for loop in list(_LIVE):
        loop.stop(join=False)
    for loop in list(_LIVE):
        loop.stop(join=True)


class Scheduler(Loop):
    """Continuous batching over slots of one shared KV buffer (see the module docstring)."""

    def __init__(self, session: Session, manifest: Manifest, tokenizer, layout: Layout, *, max_queue: int | None,
                 prefix_cache: bool, speculative: bool = False):
        super().__init__(session, manifest, tokenizer, max_queue=max_queue)
        self.layout = layout
        self.speculative = speculative  # prompt-lookup drafts verified in one step while one request runs alone
        self.slot_count = layout.slots
        self.prefix_cache = prefix_cache
        self.chunk = layout.chunk
        self.slots: list[Slot] = []
        self._prefilling: collections.deque[Request] = collections.deque()  # in a slot, prompt not done
        self._running: dict[int, Request] = {}  # slot index -> request decoding in it

    def slots_in_use(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def running_count(self) -> int:
        return len(self._running)

    def prefilling_count(self) -> int:
        return len(self._prefilling)

    def _active(self) -> list[Request]:
        return list(self._prefilling) + list(self._running.values())

    def _start(self) -> None:
        """Allocated once, on the loop's thread, before the first step."""
        manifest, layout = self.manifest, self.layout
        self.kv = SlotBuffers(self.session, layout)
        self.slots = [Slot(i) for i in range(layout.slots)]
        self.sampler = Sampler(manifest.vocab_size, threads=self.session.threads)
        self.decode_binding = self.session.ort.io_binding()
        self.prefill_binding = self.session.prefill_ort.io_binding()  # the prompt graph's, when there is one
        self._decode_bound: tuple[int, int] | None = None  # slots [lo, hi) the decode binding's views cover
        self._prefill_bound = -1  # slot the prefill binding's KV views cover
        n, vocab = layout.slots, manifest.vocab_size
        self.logits = np.zeros((n, 1, vocab), dtype=np.float32)  # (slots, 1, vocab): decode step logits
        self.prefill_logits = np.zeros((1, 1, vocab), dtype=np.float32)
        if self.speculative:
            self.spec_binding = self.session.ort.io_binding()
            self._spec_bound = -1  # slot the speculative binding's KV views cover
            self.spec_logits = np.zeros((1, DRAFT_MAX + 1, vocab), dtype=np.float32)  # a verify step's positions
        self.next_ids = np.zeros((n, 1), dtype=np.int64)  # per slot: the token the next decode step adds
        self.positions = np.zeros((n, 1), dtype=np.int64)  # ... at this position
        self.seqlens = np.zeros(n, dtype=np.int32)  # ... = the position (seqlens_k: total length - 1)
        self.total = np.zeros((), dtype=np.int32)
        self.pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
        self.rngs: list = [None] * n  # per slot, for the sampler (index = row of the decode logits)
        self.histories: list = [None] * n
        self.params: list = [None] * n

    def _has_work(self) -> bool:
        if self._running or self._prefilling or any(r._cancelled for r in self._waiting):
            return True
        return bool(self._waiting) and any(s.request is None for s in self.slots)

    def _loop(self) -> bool:
        """One step: admit, one decode over the running rows, one prefill chunk. False once stopped."""
        if not self._take_inbox():
            return False
        self._reap_cancelled()
        self._admit()
        if self._running:
            if self.speculative and len(self._running) == 1 and not self._prefilling:
                self._speculate_step()
            else:
                self._decode_step()
        if self._prefilling:
            self._prefill_step()
        return True

    def _reap_cancelled(self) -> None:
        with self._lock:
            cancelled = [r for r in self._waiting if r._cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled + [r for r in self._active() if r._cancelled]:
            self._release(r)
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting[0]
            slot, reuse = self._place(request.prompt_ids)
            if slot is None:
                return
            with self._lock:
                self._waiting.popleft()
            slot.request, slot.prompt, slot.length, slot.reusable = request, request.prompt_ids, reuse, reuse
            request.slot = slot
            request.cached_tokens = reuse
            if reuse:
                self.counters["prefix_cache_hits"] += 1
                self.counters["prefix_cached_tokens"] += reuse
            self._prefilling.append(request)

    def _place(self, ids: list[int]) -> tuple[Slot | None, int]:
        """A slot for a prompt and how many of its leading positions it already holds (copied there if needed)."""
        free = [s for s in self.slots if s.request is None]
        if not free:
            return None, 0
        limit = (len(ids) - 1) // self.chunk * self.chunk  # the last prompt token is always computed (its logits)
        best, best_n = None, 0
        if self.prefix_cache and limit:
            for s in self.slots:  # the longest held prefix; among equals, a finished slot (no copy)
                n = min(s.common(ids), limit) // self.chunk * self.chunk
                if n > best_n or (n == best_n and n and best.request is not None and s.request is None):
                    best, best_n = s, n
        if best is not None and best.request is None:
            return best, best_n  # take the finished slot over as it is
        target = min(free, key=self._placement_cost())
        if best is not None and self.kv.copy(best.index, target.index, best_n):
            return target, best_n
        return target, 0

    def _placement_cost(self):
        """The order in which free slots are taken by a prompt without a reusable prefix: first the one that widens
        the decode rows least (a decode step runs the span [lo, hi) of the live slots, idle ones inside it
        included), then an empty one, then the least recently released (its cached prompt is the one given up)."""
        live = [s.index for s in self.slots if s.request is not None]

        def cost(slot: Slot) -> tuple[int, bool, float]:
            span = max(live + [slot.index]) - min(live + [slot.index]) + 1
            return span, slot.reusable != 0, slot.released

        return cost

    def _decode_step(self) -> None:
        lo, hi = min(self._running), max(self._running) + 1  # the rows run: slots [lo, hi), one view of them
        for slot in self.slots[lo:hi]:
            if slot.index not in self._running:  # a dummy row: writes a position nothing keeps
                spare = min(slot.spare, self.layout.context - 1)
                self.next_ids[slot.index] = self.pad
                self.positions[slot.index] = spare
                self.seqlens[slot.index] = spare
        self.total[...] = int(self.seqlens[lo:hi].max()) + 1
        binding = self.decode_binding
        if self._decode_bound != (lo, hi):
            self.kv.bind(binding, lo, hi - lo)
            binding.bind_output("logits", "cpu", 0, np.float32, (hi - lo, 1, self.manifest.vocab_size),
                                self.logits[lo:hi].ctypes.data)
            self._decode_bound = (lo, hi)
        self._run(binding, {"input_ids": self.next_ids[lo:hi], "position_ids": self.positions[lo:hi],
                            "seqlens_k": self.seqlens[lo:hi], "total_sequence_length": self.total})
        rows = sorted(self._running)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(rows)
        self.counters["decode_rows_run"] += hi - lo
        for index in rows:
            self.slots[index].length += 1
        ids, logprobs = self.sampler.sample(self.logits[lo:hi, 0], self.params[lo:hi], self.rngs[lo:hi],
                                            self.histories[lo:hi], rows=[index - lo for index in rows])
        for index, token, logprob in zip(rows, ids.tolist(), logprobs):
            self._advance(self._running[index], token, logprob)

    def _speculate_step(self) -> None:
        """The one running request's step with speculation (fastllm.speculative): its last token and a prompt-lookup
        draft of k tokens in one step of k + 1 positions on its slot, then the sampler at each position in turn,
        exactly as k + 1 plain steps would draw, for as long as the drawn token is the draft's. Without a draft, a
        plain decode step."""
        ((index, request),) = self._running.items()
        slot, seq = request.slot, request.sequence
        length = slot.length
        limit = min(seq.params.max_new_tokens - len(seq.token_ids) - 1, self.layout.context - length - 1)
        drafts = request.drafter.draft(limit) if request.drafter is not None else []
        if not drafts:
            self._decode_step()
            return
        k = len(drafts)
        binding = self.spec_binding
        if self._spec_bound != index:
            self.kv.bind(binding, index, 1)
            self._spec_bound = index
        logits = self.spec_logits[:, : k + 1]  # (1, k + 1, vocab), contiguous
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self._run(binding, {"input_ids": np.array([[int(self.next_ids[index, 0]), *drafts]], dtype=np.int64),
                            "position_ids": np.arange(length, length + k + 1, dtype=np.int64)[None],
                            "seqlens_k": np.array([length + k], dtype=np.int32),
                            "total_sequence_length": np.array(length + k + 1, dtype=np.int32)},
                  keep=np.array(k + 1, dtype=np.int64))
        self.counters["speculative_steps"] += 1
        self.counters["drafted_tokens"] += k
        kept = 0
        for j in range(k + 1):
            slot.length = length + j + 1  # positions [0, length + j] now hold this request's tokens
            (token,), (logprob,) = self.sampler.sample(logits[:, j], [seq.params], [seq.rng], [seq.history])
            self._advance(request, int(token), logprob)  # ends the request, or makes it the next step's input
            if request.done or j == k or token != drafts[j]:
                break
            kept += 1
        request.drafter.update(k, kept)
        self.counters["accepted_tokens"] += kept

    def _prefill_step(self) -> None:
        request = self._prefilling[0]
        slot, ids = request.slot, request.prompt_ids
        start = slot.length
        end = min(len(ids), (start // self.chunk + 1) * self.chunk)  # chunks start at multiples of the chunk
        binding = self.prefill_binding
        if self._prefill_bound != slot.index:
            self.kv.bind(binding, slot.index, 1)
            binding.bind_output("logits", "cpu", 0, np.float32, (1, 1, self.manifest.vocab_size),
                                self.prefill_logits.ctypes.data)
            self._prefill_bound = slot.index
        self._run(binding, {"input_ids": np.asarray(ids[start:end], dtype=np.int64)[None],  # (1, n)
                            "position_ids": np.arange(start, end, dtype=np.int64)[None],
                            "seqlens_k": np.array([end - 1], dtype=np.int32),
                            "total_sequence_length": np.array(end, dtype=np.int32)},
                  ort_session=self.session.prefill_ort)
        slot.length = end
        slot.reusable = min(end, len(ids) - 1) // self.chunk * self.chunk
        if end < len(ids):
            return
        self._prefilling.popleft()
        self.counters["prompt_tokens"] += len(ids)
        seq, i = request.sequence, slot.index
        self.rngs[i], self.histories[i], self.params[i] = seq.rng, seq.history, seq.params
        self._running[i] = request
        if self.speculative:
            request.drafter = PromptLookup(ids, len(ids) + seq.params.max_new_tokens)
        (token,), (logprob,) = self.sampler.sample(self.prefill_logits[:, 0], [seq.params], [seq.rng],
                                                   [seq.history])
        self._advance(request, int(token), logprob)

    def _run(self, binding: ort.IOBinding, feeds: dict[str, np.ndarray], keep: np.ndarray = _KEEP_ONE,
             ort_session: ort.InferenceSession | None = None) -> None:
        names = self.session.input_names
        for name, array in feeds.items():
            if name in names:  # graphs drop inputs they do not use (e.g. position_ids with rotary inside)
                binding.bind_cpu_input(name, array)
        if "logits_to_keep" in names:
            binding.bind_cpu_input("logits_to_keep", keep)
        (ort_session or self.session.ort).run_with_iobinding(binding)

    def _advance(self, request: Request, token: int, logprob) -> None:
        if self._emit(request, token, logprob):
            self._release(request)
            self._finish(request, None)
            return
        i, length = request.slot.index, request.slot.length
        self.next_ids[i, 0] = token
        self.positions[i, 0] = length
        self.seqlens[i] = length

    def _release(self, request: Request) -> None:
        """Free a request's slot, keeping its prompt's KV for reuse (unless the prefix cache is off)."""
        slot = getattr(request, "slot", None)
        if slot is None or slot.request is not request:
            return
        if request in self._prefilling:
            self._prefilling.remove(request)
        i = slot.index
        self._running.pop(i, None)
        self.rngs[i] = self.histories[i] = self.params[i] = None
        slot.request = None
        slot.length = 0
        slot.released = time.perf_counter()
        if not self.prefix_cache:
            slot.reusable = 0

    def _fail_all(self, error: BaseException) -> None:
        super()._fail_all(error)
        self._decode_bound, self._prefill_bound, self._spec_bound = None, -1, -1


class SerialScheduler(Loop):
    """The portable graph's loop: one request at a time, each with a KV cache of its own (fastllm.kv_cache);
    the same Request API as Scheduler."""

    slot_count = 1

    def __init__(self, session: Session, manifest: Manifest, tokenizer, *, max_queue: int | None):
        super().__init__(session, manifest, tokenizer, max_queue=max_queue)
        self._current: Request | None = None

    def slots_in_use(self) -> int:
        return int(self._current is not None)

    def running_count(self) -> int:
        return int(self._current is not None)

    def prefilling_count(self) -> int:
        return 0

    def _active(self) -> list[Request]:
        return [self._current] if self._current is not None else []

    def _start(self) -> None:
        self.sampler = Sampler(self.manifest.vocab_size, threads=self.session.threads)

    def _has_work(self) -> bool:
        return bool(self._waiting)

    def _release(self, request: Request) -> None:
        if self._current is request:
            self._current = None

    def _loop(self) -> bool:
        if not self._take_inbox():
            return False
        with self._lock:
            request = self._waiting.popleft()
        if request._cancelled:
            self._finish(request, "cancelled")
            return True
        self._current = request
        seq, params = request.sequence, request.params
        ids = seq.prompt_ids
        cache = self.session.new_cache(1, len(ids), params.max_new_tokens)
        binding = self.session.ort.io_binding()
        logits = np.empty((1, 1, self.manifest.vocab_size), dtype=np.float32)
        try:
            for feeds in cache.prefill_steps([ids], 0, PREFILL_CHUNK):
                self.session.forward(cache, binding, feeds, out=logits)
            self.counters["prompt_tokens"] += len(ids)
            while True:
                if request._cancelled or self._stopped:
                    self._finish(request, "cancelled")
                    return True
                (token,), (logprob,) = self.sampler.sample(logits[:, -1], [params], [seq.rng], [seq.history])
                if self._emit(request, int(token), logprob):
                    self._finish(request, None)
                    return True
                self.session.forward(cache, binding, cache.decode(np.array([[token]], dtype=np.int64)), out=logits)
        finally:
            self._current = None
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

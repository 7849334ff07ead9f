"""The serving workload: many requests against one engine, as a server sees them. Run in a worker process per model
(`python -m fastllm.bench.serving JOB.json RESULT.json`), driven by bench.serving_runner.

    together  at each concurrency c, waves of c requests (fixed prompt and output length) submitted at once
    poisson   requests arriving as a Poisson stream at `rate` per second (fixed seed), at most c in flight
    prefix    a prompt whose first `prefix_length` tokens are in the prefix cache, against the same-length prompt
              whose prefix is not: their time to first token

Each request is submitted with Engine.submit and its Steps are read by a thread of its own, which stamps each Step
as it arrives: TTFT = first Step - submit, TPOT = (last Step - first Step) / (steps - 1). Greedy, EOS ignored, so
every request has the same length. An engine without submit (before continuous batching) is driven the old way:
one Engine.steps() decode loop per request thread, which the results name as api "steps".
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastllm.errors import InvalidParameterError

WORKLOADS = ("together", "poisson")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidParameterError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ServingWorkload:
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)  # requests in flight at once
    prompt_length: int = 128  # random ids per request prompt
    new_tokens: int = 128  # generated per request (greedy, EOS ignored)
    workloads: tuple[str, ...] = WORKLOADS
    min_requests: int = 8  # together: at least this many requests per concurrency ...
    min_waves: int = 2  # ... in at least this many waves: waves = max(min_waves, ceil(min_requests / c))
    rate: float = 2.0  # poisson: mean arrivals per second
    poisson_requests: int = 24  # poisson: requests per concurrency
    prefix_length: int = 1024  # prefix-cache measurement: cached prompt tokens (0: not measured)
    prefix_suffix: int = 64  # ... uncached tokens after them
    prefix_new_tokens: int = 4  # ... generated (only the first token's time counts)
    prefix_repeats: int = 3  # ... pairs (uncached, cached), each with a prefix of its own; medians reported
    threads: int = 2  # intra-op threads of the engine
    slots: int | None = None  # the engine's slots; default: the largest concurrency
    prefill_chunk: int | None = None  # the engine's prefill chunk (prompt positions per step); None: its default
    warmup: bool = True  # untimed requests before the timed ones (one alone, one wave at the largest concurrency)
    seed: int = 0  # of the prompt ids and the arrival times

    def __post_init__(self):
        levels = tuple(self.concurrency)
        if not levels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in levels):
            raise InvalidParameterError(f"concurrency must be one or more integers >= 1, got {levels!r}")
        object.__setattr__(self, "concurrency", tuple(sorted(set(levels))))
        kinds = tuple(dict.fromkeys((self.workloads,) if isinstance(self.workloads, str) else self.workloads))
        if not kinds or any(k not in WORKLOADS for k in kinds):
            raise InvalidParameterError(f"workloads must be one or more of {', '.join(WORKLOADS)}, got {kinds!r}")
        object.__setattr__(self, "workloads", kinds)
        for name, low in (("prompt_length", 1), ("new_tokens", 2), ("min_requests", 1), ("min_waves", 1),
                          ("poisson_requests", 1), ("prefix_length", 0), ("prefix_suffix", 1),
                          ("prefix_new_tokens", 1), ("prefix_repeats", 1), ("threads", 1), ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        for name in ("slots", "prefill_chunk"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if not isinstance(self.rate, (int, float)) or isinstance(self.rate, bool) or not 0 < self.rate < math.inf:
            raise InvalidParameterError(f"rate must be a number of requests per second > 0, got {self.rate!r}")

    @property
    def engine_slots(self) -> int:
        return self.slots or max(self.concurrency)

    def waves(self, concurrency: int) -> int:
        return max(self.min_waves, math.ceil(self.min_requests / concurrency))

    def context_needed(self) -> int:
        """Positions a slot must hold: the longest request of any measurement."""
        prefix = self.prefix_length + self.prefix_suffix + self.prefix_new_tokens if self.prefix_length else 0
        return max(self.prompt_length + self.new_tokens, prefix)

    def to_dict(self) -> dict:
        return {**asdict(self), "engine_slots": self.engine_slots}


# -- one request ---------------------------------------------------------------------------------------------------
class Timed:
    """One request: submitted, then read by a thread of its own that stamps every Step as it arrives."""

    def __init__(self, engine, api: str, ids: list[int], params, *, arrival: float | None = None,
                 on_done=None):
        self.stamps: list[float] = []
        self.finish_reason: str | None = None
        self.cached_tokens: int | None = None
        self.error: str | None = None
        self.on_done = on_done
        self.submitted = time.perf_counter()
        self.arrival = self.submitted if arrival is None else arrival
        if api == "submit":
            self.request = engine.submit(ids, params)  # never blocks; raises at once on a bad request
            self.thread = threading.Thread(target=self._read, daemon=True)
        else:
            self.request = None
            self.thread = threading.Thread(target=self._decode, args=(engine, ids, params), daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for step in self.request:
                self.stamps.append(time.perf_counter())
                self.finish_reason = step.finish_reason or self.finish_reason
            self.cached_tokens = getattr(self.request.result(), "cached_tokens", None)
        except Exception as e:  # noqa: BLE001 -- reported in the results
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if self.on_done:
                self.on_done()

    def _decode(self, engine, ids: list[int], params) -> None:
        try:
            for (step,) in engine.steps(ids, params):
                if step is not None:
                    self.stamps.append(time.perf_counter())
                    self.finish_reason = step.finish_reason or self.finish_reason
        except Exception as e:  # noqa: BLE001 -- reported in the results
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if self.on_done:
                self.on_done()

    def join(self) -> Timed:
        self.thread.join()
        return self

    def record(self, origin: float) -> dict:
        """Times relative to `origin` (the start of its wave or stream), and the request's TTFT and TPOT."""
        if self.error is not None:
            raise RuntimeError(f"a request failed: {self.error}")
        n = len(self.stamps)
        return {
            "arrival_s": self.arrival - origin,
            "submitted_s": self.submitted - origin,
            "first_s": self.stamps[0] - origin,
            "last_s": self.stamps[-1] - origin,
            "tokens": n,
            "queue_s": self.submitted - self.arrival,  # waiting for one of c in flight to finish (poisson)
            "ttft_s": self.stamps[0] - self.submitted,
            "tpot_s": (self.stamps[-1] - self.stamps[0]) / (n - 1) if n > 1 else None,
            "finish_reason": self.finish_reason,
            "cached_tokens": self.cached_tokens,
        }


# -- metrics -------------------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else None


def decode_rate(requests: list[dict]) -> float | None:
    """Aggregate decode tokens/s of requests that ran together: the Steps that arrived while every one of them was
    decoding (after the last first token, up to the first last token) per second of that window. Prefill of the
    others (staggered when they arrive together) and the tail where some already finished are outside it. One
    request: its decode tokens/s. None when the window holds no Step."""
    lo = max(r["first_s"] for r in requests)
    hi = min(r["last_s"] for r in requests)
    steps = sum(sum(1 for t in r["stamps_s"] if lo < t <= hi) for r in requests)
    return steps / (hi - lo) if hi > lo and steps else None


def load_average() -> float | None:
    """The machine's 1-minute load average: other work sharing the cores shows up here."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def summarise(requests: list[dict], wall_s: float) -> dict:
    tokens = sum(r["tokens"] for r in requests)
    return {
        "requests": len(requests),
        "generated_tokens": tokens,
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,  # every generated token / wall time
        "ttft_p50_s": _pct([r["ttft_s"] for r in requests], 50),
        "ttft_p95_s": _pct([r["ttft_s"] for r in requests], 95),
        "tpot_p50_s": _pct([r["tpot_s"] for r in requests], 50),
        "tpot_p95_s": _pct([r["tpot_s"] for r in requests], 95),
    }


# -- the measurements ----------------------------------------------------------------------------------------------
class Driver:
    """One loaded engine and how requests are put to it."""

    def __init__(self, engine, api: str, workload: ServingWorkload):
        import fastllm

        self.engine, self.api, self.workload = engine, api, workload
        self.params = fastllm.SamplingParams(max_new_tokens=workload.new_tokens, temperature=0.0, ignore_eos=True)
        self.rng = np.random.default_rng([workload.seed, workload.prompt_length])
        self.vocab = engine.manifest.vocab_size

    def prompt(self, length: int | None = None) -> list[int]:
        """Random ids, a new prompt each time (so no request finds another's prompt in the prefix cache)."""
        return self.rng.integers(0, self.vocab, size=length or self.workload.prompt_length).tolist()

    def wave(self, concurrency: int, params=None) -> tuple[list[dict], float]:
        """`concurrency` requests submitted at once; returns their records and the wave's wall time (first submit
        to last Step)."""
        prompts = [self.prompt() for _ in range(concurrency)]
        origin = time.perf_counter()
        running = [Timed(self.engine, self.api, ids, params or self.params) for ids in prompts]
        records = []
        for timed in running:
            record = timed.join().record(origin)
            record["stamps_s"] = [t - origin for t in timed.stamps]
            records.append(record)
        return records, max(r["last_s"] for r in records)

    def warm_up(self) -> None:
        params = self.params.replace(max_new_tokens=min(16, self.workload.new_tokens))
        self.wave(1, params)
        self.wave(max(self.workload.concurrency), params)

    def together(self, concurrency: int) -> dict:
        waves = []
        for _ in range(self.workload.waves(concurrency)):
            records, wall = self.wave(concurrency)
            waves.append({"wall_s": wall, "decode_tok_s": decode_rate(records), "requests": records})
        records = [r for w in waves for r in w["requests"]]
        rates = [w["decode_tok_s"] for w in waves if w["decode_tok_s"] is not None]
        for r in records:
            del r["stamps_s"]  # kept per wave only for the decode window
        return {"concurrency": concurrency, "waves": len(waves), "load_average": load_average(),
                **summarise(records, sum(w["wall_s"] for w in waves)),
                "decode_tok_s": float(np.median(rates)) if rates else None,  # median over waves
                "decode_tok_s_waves": [w["decode_tok_s"] for w in waves],
                "wave_wall_s": [w["wall_s"] for w in waves],
                "raw": records}

    def poisson(self, concurrency: int) -> dict:
        """Arrivals at exponential gaps (mean 1/rate, seeded); a request that arrives while `concurrency` are in
        flight is submitted when one of them finishes (its wait is queue_s; TTFT counts from the submit)."""
        w = self.workload
        gaps = np.random.default_rng([w.seed, concurrency, 1]).exponential(1 / w.rate, size=w.poisson_requests)
        arrivals = np.cumsum(gaps) - gaps[0]  # the first arrives at once
        prompts = [self.prompt() for _ in range(w.poisson_requests)]
        free = threading.Semaphore(concurrency)
        origin = time.perf_counter()
        running = []
        for at, ids in zip(arrivals, prompts):
            delay = origin + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            free.acquire()
            running.append(Timed(self.engine, self.api, ids, self.params, arrival=origin + at, on_done=free.release))
        records = [timed.join().record(origin) for timed in running]
        wall = max(r["last_s"] for r in records)
        busy = sum(r["last_s"] - r["submitted_s"] for r in records)
        return {"concurrency": concurrency, "rate": w.rate, "load_average": load_average(),
                **summarise(records, wall),
                "queue_p50_s": _pct([r["queue_s"] for r in records], 50),
                "queue_p95_s": _pct([r["queue_s"] for r in records], 95),
                "mean_in_flight": busy / wall if wall > 0 else None,
                "offered_s": float(arrivals[-1]), "raw": records}

    def prefix(self) -> dict:
        """Pairs of prompts of the same length: the first (uncached) puts its prefix in the cache, the second
        shares that prefix and differs after it. One untimed pair first (warm-up)."""
        w = self.workload
        params = self.params.replace(max_new_tokens=w.prefix_new_tokens)
        pairs = []
        for i in range(w.prefix_repeats + (1 if w.warmup else 0)):
            head = self.prompt(w.prefix_length)
            first = Timed(self.engine, self.api, head + self.prompt(w.prefix_suffix), params).join()
            second = Timed(self.engine, self.api, head + self.prompt(w.prefix_suffix), params).join()
            if i == 0 and w.warmup:
                continue
            u, c = first.record(first.submitted), second.record(second.submitted)
            pairs.append({"uncached_ttft_s": u["ttft_s"], "cached_ttft_s": c["ttft_s"],
                          "uncached_cached_tokens": u["cached_tokens"], "cached_tokens": c["cached_tokens"]})
        uncached = float(np.median([p["uncached_ttft_s"] for p in pairs]))
        cached = float(np.median([p["cached_ttft_s"] for p in pairs]))
        return {"prefix_length": w.prefix_length, "prompt_length": w.prefix_length + w.prefix_suffix,
                "uncached_ttft_s": uncached, "cached_ttft_s": cached, "ratio": cached / uncached,
                "cached_tokens": [p["cached_tokens"] for p in pairs], "pairs": pairs}


def _load(path: str, workload: ServingWorkload, *, slots: int, context: int):
    """The engine and the API it offers: "submit" (continuous batching over `slots`) or "steps" (one decode loop
    per request, before continuous batching)."""
    import fastllm

    accepted = inspect.signature(fastllm.load).parameters
    wanted = {"slots": slots, "context": context, "prefix_cache": True, "prefill_chunk": workload.prefill_chunk}
    options = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    engine = fastllm.load(path, threads=workload.threads, **options)
    return engine, ("submit" if hasattr(engine, "submit") else "steps"), options


def _close(engine) -> None:
    if hasattr(engine, "close"):
        engine.close()


def _stats(engine) -> dict | None:
    return engine.stats() if hasattr(engine, "stats") else None


def measure(job: dict) -> dict:
    from fastllm.bench.workers import _peak_rss_bytes

    workload = ServingWorkload(**{**job["workload"], "concurrency": tuple(job["workload"]["concurrency"]),
                                  "workloads": tuple(job["workload"]["workloads"])})
    path = job["model_path"]
    t0 = time.perf_counter()
    context = workload.prompt_length + workload.new_tokens
    engine, api, options = _load(path, workload, slots=workload.engine_slots, context=context)
    result = {"api": api, "load_options": options, "load_s": time.perf_counter() - t0,
              "rss_after_load_bytes": _peak_rss_bytes()}
    driver = Driver(engine, api, workload)
    try:
        if workload.warmup:
            driver.warm_up()
        if "together" in workload.workloads:
            result["together"] = [driver.together(c) for c in workload.concurrency]
        if "poisson" in workload.workloads:
            result["poisson"] = [driver.poisson(c) for c in workload.concurrency]
        result["stats"] = _stats(engine)
    finally:
        _close(engine)
    if workload.prefix_length:
        # its own engine: two slots of the longer context (the prefix measurement's prompts are longer)
        engine, _, options = _load(path, workload, slots=2, context=workload.context_needed())
        try:
            result["prefix"] = {**Driver(engine, api, workload).prefix(), "load_options": options,
                                "stats": _stats(engine)}
        finally:
            _close(engine)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    return result


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = measure(json.loads(job_path.read_text()))
    except Exception as e:  # noqa: BLE001 -- reported in the results, the benchmark goes on with the next model
        result = {"error": f"{type(e).__name__}: {e}"}
    result_path.write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))

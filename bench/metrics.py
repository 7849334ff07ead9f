"""Turning per-step timestamps into TTFT, TPOT and tokens/s, and runs into medians with their spread.

A run's timestamps: `start` just before the engine is given the prompt, then one stamp after each step has produced
a token for every row. TTFT = stamps[0] - start (prefill and the first token). The decode steps are the intervals
between stamps; TPOT p50/p90 are over those, and decode tokens/s = batch x steps / (stamps[-1] - stamps[0]).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

RUN_METRICS = ("ttft_s", "tpot_p50_s", "tpot_p90_s", "decode_tok_s", "total_s")


def run_metrics(start: float, stamps: list[float], *, batch: int) -> dict:
    """One run's numbers; `steps_s` keeps every decode interval (the raw data behind the percentiles)."""
    if len(stamps) < 2:
        raise ValueError(f"a run needs at least 2 token stamps to time decoding, got {len(stamps)}")
    steps = np.diff(np.asarray(stamps, dtype=np.float64))  # (new_tokens - 1,)
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": stamps[0] - start,
        "tpot_p50_s": float(np.percentile(steps, 50)),
        "tpot_p90_s": float(np.percentile(steps, 90)),
        "decode_tok_s": batch * len(steps) / decode_s if decode_s > 0 else math.inf,
        "total_s": stamps[-1] - start,
        "steps_s": [float(s) for s in steps],
    }


def summarise(runs: list[dict]) -> dict:
    """Per metric over runs: median, min and max."""
    out = {}
    for name in RUN_METRICS:
        values = [r[name] for r in runs]
        out[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out

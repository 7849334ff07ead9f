"""pytest-benchmark: the per-token stop-string check at 100 and at 20,000 characters of output
(outside the default test run: .venv/bin/python -m pytest bench/test_micro_stop.py --benchmark-only).

`window` is the engine's check (fastllm.engine.StopStrings.feed: the new piece plus the longest stop string - 1
characters before it, hold-back updated from the last one); `whole_text` is the search it replaced (every stop string
searched over the whole text, the hold-back recomputed over the tail), kept here as the baseline. The window's time
should not move between the two lengths.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("pytest_benchmark")

from fastllm.engine import StopStrings

STOPS = ("<|im_end|>", "\n\nUser:", "###")
PIECE = " word"  # a typical decoded token


def _text(length: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choice("abcdefgh ,.\n") for _ in range(length))


def _whole_text(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    hits = [at for at in (text.find(s) for s in stops) if at >= 0]
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                hold = max(hold, n)
                break
    return (min(hits) if hits else None), hold


@pytest.mark.parametrize("length", [100, 20_000])
def test_stop_check_window(benchmark, length):
    matcher, text = StopStrings(STOPS), _text(length)
    for at in range(0, length, 5):  # the output so far, fed as the engine feeds it
        assert matcher.feed(text[at : at + 5]) is None
    assert benchmark(matcher.feed, PIECE) is None
    assert matcher.examined <= len(PIECE) + max(map(len, STOPS)) - 1


@pytest.mark.parametrize("length", [100, 20_000])
def test_stop_check_whole_text(benchmark, length):
    text = _text(length) + PIECE
    assert benchmark(_whole_text, text, STOPS)[0] is None

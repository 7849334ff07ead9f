"""What is timed: prompt lengths x batch sizes x sampling modes, new tokens, threads, runs; and the prompt ids every
engine gets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fastllm.errors import InvalidParameterError


def _positive_ints(name: str, values) -> tuple[int, ...]:
    values = tuple(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise InvalidParameterError(f"{name} must be one or more integers >= 1, got {values!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class Case:
    """One workload point: `batch` prompts of `prompt_length` random ids each."""

    prompt_length: int
    batch: int

    def __str__(self) -> str:
        return f"prompt {self.prompt_length} x batch {self.batch}"


@dataclass(frozen=True)
class Sampling:
    """How every engine picks tokens in one mode; EOS is ignored either way, so every run has the same length."""

    name: str
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __str__(self) -> str:
        if self.greedy:
            return self.name
        return (f"{self.name} (temperature {self.temperature}, top_p {self.top_p}, repetition penalty "
                f"{self.repetition_penalty})")


SAMPLINGS = {s.name: s for s in (Sampling("greedy"),
                                 Sampling("sampled", temperature=0.8, top_p=0.95, repetition_penalty=1.1))}


@dataclass(frozen=True)
class Workload:
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    new_tokens: int = 64  # every engine generates exactly this many per row (EOS ignored)
    batch_sizes: tuple[int, ...] = (1, 4)
    sampling: tuple[str, ...] = ("greedy", "sampled")  # modes timed per case (SAMPLINGS), in this order
    threads: int = 2  # intra-op threads of every engine
    runs: int = 3  # timed runs per case; medians and min/max are reported over these
    warmup: int = 1  # untimed runs first, in the same process
    seed: int = 0  # of the prompt ids

    def __post_init__(self):
        object.__setattr__(self, "prompt_lengths", _positive_ints("prompt_lengths", self.prompt_lengths))
        object.__setattr__(self, "batch_sizes", _positive_ints("batch_sizes", self.batch_sizes))
        modes = tuple(dict.fromkeys((self.sampling,) if isinstance(self.sampling, str) else self.sampling))
        if not modes or any(m not in SAMPLINGS for m in modes):
            raise InvalidParameterError(f"sampling must be one or more of {', '.join(SAMPLINGS)}, got {modes!r}")
        object.__setattr__(self, "sampling", modes)
        for name, low in (("new_tokens", 2), ("threads", 1), ("runs", 1), ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidParameterError(f"{name} must be an integer >= {low}, got {value!r}")

    def cases(self, max_context: int) -> tuple[list[Case], list[int]]:
        """The cases that fit in `max_context` (prompt + new tokens), and the prompt lengths left out."""
        fits = [n for n in self.prompt_lengths if n + self.new_tokens <= max_context]
        dropped = [n for n in self.prompt_lengths if n not in fits]
        return [Case(n, b) for n in fits for b in self.batch_sizes], dropped

    def prompt_ids(self, case: Case, vocab_size: int) -> np.ndarray:
        """(batch, prompt_length) int64, the same for every engine (seeded by seed, length and batch)."""
        rng = np.random.default_rng([self.seed, case.prompt_length, case.batch])
        return rng.integers(0, vocab_size, size=(case.batch, case.prompt_length), dtype=np.int64)

    def samplings(self) -> list[Sampling]:
        return [SAMPLINGS[name] for name in self.sampling]

    def to_dict(self) -> dict:
        return {**asdict(self), "sampling": {s.name: asdict(s) for s in self.samplings()}}

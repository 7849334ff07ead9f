"""SamplingParams and the one `sample()` that turns a row of logits into a token id."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fastllm.errors import InvalidParameterError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameterError(message)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _got(value, ok_type: bool = True) -> str:
    """`got 1.5`, or `got '0.5' of type str` when the type is the problem."""
    return f"got {value!r}" if ok_type else f"got {value!r} of type {type(value).__name__}"


def _strings(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    _check(isinstance(value, (list, tuple)), f"{name} must be a string or a list of strings, {_got(value, False)}")
    return tuple(value)


def _ints(value, name: str) -> tuple:
    if _is_int(value):
        return (value,)
    _check(isinstance(value, (list, tuple, np.ndarray)),
           f"{name} must be an integer or a list of integers, {_got(value, False)}")
    return tuple(value.tolist() if isinstance(value, np.ndarray) else value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 is greedy; the filters apply in the order listed here.

    repetition_penalty follows the CTRL / Hugging Face rule over prompt and output tokens (a seen token's positive
    logit is divided by it, a negative one multiplied); presence_penalty and frequency_penalty follow the OpenAI
    rule over output tokens (logit -= presence * [count > 0] + frequency * count).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings, not included in the text
    stop_token_ids: tuple[int, ...] = ()  # ends the sequence in addition to the model's EOS ids
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", _strings(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _ints(self.stop_token_ids, "stop_token_ids"))
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, {_got(self.max_new_tokens, _is_int(self.max_new_tokens))}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0 (0 = greedy), {_got(self.temperature, _is_number(self.temperature))}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), {_got(self.top_k, _is_int(self.top_k))}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], {_got(self.top_p, _is_number(self.top_p))}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], {_got(self.min_p, _is_number(self.min_p))}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 (1 = off), "
               f"{_got(self.repetition_penalty, _is_number(self.repetition_penalty))}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2,
                   f"{name} must be in [-2, 2], {_got(value, _is_number(value))}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(isinstance(self.ignore_eos, (bool, np.bool_)),
               f"ignore_eos must be True or False, {_got(self.ignore_eos, False)}")
        seed_type_ok = self.seed is None or _is_int(self.seed)
        _check(self.seed is None or _is_int(self.seed) and self.seed >= 0,
               f"seed must be a non-negative integer or None, {_got(self.seed, seed_type_ok)}")

    @classmethod
    def from_mapping(cls, values: Mapping) -> SamplingParams:
        """SamplingParams(**values), refusing names it does not have (they would otherwise be a bare TypeError)."""
        _check_names(values, "params")
        return cls(**values)

    @classmethod
    def from_generation_config(cls, config: Mapping) -> SamplingParams:
        """The defaults a model ships in its Hugging Face generation_config (fastllm.json `generation`).

        do_sample false or absent is greedy (temperature 0), as in transformers; do_sample true samples at the
        config's temperature (1.0 when it sets none), top_k and top_p. repetition_penalty applies either way.
        Fields the config does not set keep this class's defaults.
        """
        names = ("temperature", "top_k", "top_p") if config.get("do_sample") else ()
        fields = {name: config[name] for name in names if config.get(name) is not None}
        if config.get("do_sample"):
            fields.setdefault("temperature", 1.0)
        if config.get("repetition_penalty") is not None:
            fields["repetition_penalty"] = config["repetition_penalty"]
        return cls(**fields)

    def replace(self, **changes) -> SamplingParams:
        """A copy with `changes` applied (checked like a new SamplingParams)."""
        _check_names(changes, "replace()")
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _check_names(values: Mapping, where: str) -> None:
    unknown = [k for k in values if k not in FIELDS]
    _check(not unknown, f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; the fields of SamplingParams "
                        f"are {', '.join(FIELDS)}")


def as_params(value) -> SamplingParams:
    """What generate/stream/tokens accept as params besides None: a SamplingParams or a mapping of its fields."""
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        return SamplingParams.from_mapping(value)
    raise InvalidParameterError(f"params must be a SamplingParams, a dict of its fields or None, got "
                                f"{type(value).__name__}")


class TokenHistory:
    """What the penalties need for one sequence: which tokens were seen, and how often each was generated."""

    def __init__(self, vocab_size: int, prompt_ids):
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self.counts = np.zeros(vocab_size, dtype=np.int32)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def apply_penalties(logits: np.ndarray, params: SamplingParams, history: TokenHistory | None) -> np.ndarray:
    if history is None:
        return logits
    if params.repetition_penalty != 1.0:
        seen = history.seen
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / params.repetition_penalty,
                                logits[seen] * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        logits -= params.presence_penalty * (history.counts > 0) + params.frequency_penalty * history.counts
    return logits


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from, after temperature, top_k, top_p and min_p (float64, sums to 1)."""
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        p = nucleus(p, params.top_p)
    if params.min_p > 0.0:
        p[p < params.min_p * p.max()] = 0.0
        p /= p.sum()
    return p


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the token crossing it included).

    Sorting the whole vocabulary costs milliseconds at 50k entries; the kept set is usually small, so sort only
    the `m` largest (argpartition), doubling m until their mass reaches top_p.
    """
    m = min(64, p.size)
    while True:
        top = np.argpartition(-p, m - 1)[:m] if m < p.size else np.arange(p.size)
        order = top[np.argsort(-p[top], kind="stable")]
        cumulative = np.cumsum(p[order])
        if cumulative[-1] >= top_p or m == p.size:
            cut = int(np.searchsorted(cumulative, top_p, side="left")) + 1
            kept = np.zeros_like(p)
            kept[order[:cut]] = p[order[:cut]]
            return kept / kept.sum()
        m = min(4 * m, p.size)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           history: TokenHistory | None = None) -> int:
    """logits: (vocab,) for one sequence. Returns the chosen token id."""
    if history is not None and (params.repetition_penalty != 1.0 or params.presence_penalty
                                or params.frequency_penalty):
        logits = apply_penalties(np.array(logits, dtype=np.float32), params, history)  # a copy: penalties write
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params)
    cumulative = np.cumsum(p)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), p.size - 1))

"""SamplingParams, and the Sampler that turns rows of logits into token ids (and their log-probabilities).

The cost per token is a small fraction of a decode step at any vocabulary size: the logits stay float32 and are
read in place (penalties write the seen ids and put them back); the one full pass that needs a transcendental,
exp(logits / T) with its running block sums, runs in the C kernels (`native`: vectorised, a large step's rows split
over helper threads) or, where they are not built, in ONNX Runtime (`exp_kernel`); plain temperature and top-p draw
from that by inverse CDF (top-p by rejection: a draw is kept when the mass ahead of it is below top-p, one C pass);
logprobs' alternatives are one C selection pass; top-k / min-p / a small top-p work on a bounded candidate set found
from a threshold, never by sorting the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fastllm import native
from fastllm.errors import InvalidParameterError
from fastllm.exp_kernel import _SPLIT_FROM, ExpKernel, block_size

native_lib = native.lib  # the C kernels a new Sampler uses, or None (then numpy and the ONNX Runtime exp kernel)
_NATIVE_TOP = 64  # the most alternatives the C top-k selection keeps (logprobs ask for <= MAX_LOGPROBS)


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


def _bias(value) -> tuple[tuple[int, float], ...]:
    """{id: bias} (ids may be strings of digits, as JSON object keys are) or (id, bias) pairs -> sorted pairs."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        _check(isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value),
               f"logit_bias must be a mapping of token id to bias, {_got(value, False)}")
        pairs = [tuple(p) for p in value]
    out = {}
    for key, bias in pairs:
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        _check(_is_int(token) and token >= 0,
               f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        _check(_is_number(bias) and -100 <= bias <= 100,
               f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {key!r}")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


MAX_LOGPROBS = 20  # the most alternatives `logprobs` / `prompt_logprobs` may ask for (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 is greedy; the filters apply in the order listed here.

    repetition_penalty follows the CTRL / Hugging Face rule over prompt and output tokens (a seen token's positive
    logit is divided by it, a negative one multiplied); presence_penalty and frequency_penalty follow the OpenAI
    rule over output tokens (logit -= presence * [count > 0] + frequency * count).

    logit_bias ({token id: bias in [-100, 100]}, as OpenAI's) is added to the raw logits before anything else.

    logprobs are those of the distribution after the logit bias, the penalties and the temperature, before top_k /
    top_p / min_p truncate it (greedy: after the bias and penalties, at temperature 1); see Sampler.sample.
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
    logprobs: int | None = None  # per generated token: its logprob and the N most likely alternatives (0 = its own)
    prompt_logprobs: int | None = None  # the same for every prompt token (as Engine.score computes them)
    logit_bias: tuple[tuple[int, float], ...] = ()  # given as a mapping {id: bias}; kept as sorted (id, bias) pairs

    def __post_init__(self):
        object.__setattr__(self, "logit_bias", _bias(self.logit_bias))
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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            type_ok = value is None or _is_int(value)
            _check(value is None or _is_int(value) and 0 <= value <= MAX_LOGPROBS,
                   f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, {_got(value, type_ok)}")
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

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@functools.lru_cache(maxsize=256)
def _bias_arrays(params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """params.logit_bias as arrays: ids (n,) int64, biases (n,) float32."""
    ids, values = zip(*params.logit_bias)
    return np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)


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


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the `logprobs` most likely alternatives, most likely first.

    Of the distribution after the penalties and the temperature, before top_k / top_p / min_p (greedy: after the
    penalties, at temperature 1), so a truncated-away alternative keeps its logprob and the values sum to <= 1.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # ((id, logprob), ...), len == params.logprobs


class TokenHistory:
    """What the penalties need for one sequence: the distinct ids seen (prompt and output) and how often each was
    generated, kept compact (the penalties touch these ids only, never a vocabulary-sized mask)."""

    def __init__(self, vocab_size: int, prompt_ids):
        self.vocab_size = vocab_size
        prompt = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        capacity = max(64, 2 * prompt.size)
        self._ids = np.zeros(capacity, dtype=np.int64)  # (capacity,): distinct ids in order of first sight
        self._ids[: prompt.size] = prompt
        self._counts = np.zeros(capacity, dtype=np.int32)  # (capacity,): times generated, aligned with _ids
        self._size = prompt.size
        self._index = dict(zip(prompt.tolist(), range(prompt.size)))  # id -> its position in _ids
        self._term: np.ndarray | None = None  # (capacity,) float32: the presence/frequency subtrahend (`term`)
        self._term_key: tuple[float, float] | None = None  # the (presence, frequency) it was made for

    def add(self, token: int) -> None:
        at = self._index.get(token)
        if at is None:
            if self._size == self._ids.size:
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
                if self._term is not None:
                    self._term = np.concatenate([self._term, np.zeros_like(self._term)])
            at = self._index[token] = self._size
            self._ids[at] = token
            self._size += 1
        self._counts[at] += 1
        if self._term is not None:  # kept up to date: the same arithmetic as `term` makes for every id
            presence, frequency = self._term_key
            count = int(self._counts[at])
            self._term[at] = presence * (count > 0) + frequency * count

    def term(self, presence: float, frequency: float) -> np.ndarray:
        """(n,) float32, aligned with `ids`: presence * [count > 0] + frequency * count (the OpenAI penalties'
        subtrahend), computed once for these two values and then updated by `add` one id at a time."""
        if self._term_key != (presence, frequency):
            self._term = np.zeros(self._ids.size, dtype=np.float32)
            counts = self.counts
            self._term[: self._size] = (presence * (counts > 0) + frequency * counts).astype(np.float32)
            self._term_key = (presence, frequency)
        return self._term[: self._size]

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64: every distinct id seen so far."""
        return self._ids[: self._size]

    @property
    def counts(self) -> np.ndarray:
        """(n,) int32: how often each of `ids` was generated (0 for an id seen only in the prompt)."""
        return self._counts[: self._size]


def penalised(values: np.ndarray, params: SamplingParams, history: TokenHistory) -> np.ndarray:
    """The logits `values` of history.ids after the penalties (a new float32 array): a positive value divided by
    the repetition penalty, any other multiplied, then the presence/frequency term subtracted (float32)."""
    rep = np.float32(params.repetition_penalty)
    if rep != 1.0:
        out = values * rep
        np.divide(values, rep, out=out, where=values > 0)
    else:
        out = values.copy()
    if params.presence_penalty or params.frequency_penalty:
        out -= history.term(params.presence_penalty, params.frequency_penalty)
    return out


def apply_penalties(logits: np.ndarray, params: SamplingParams, history: TokenHistory | None) -> np.ndarray:
    """Penalise `logits` (vocab,) in place, at the seen ids only; returns it."""
    if history is not None and params.penalised:
        logits[history.ids] = penalised(logits[history.ids], params, history)
    return logits


_BLOCK = 1024  # a full-vocabulary draw: cumulative sums of blocks, then a cumsum inside one block; this size where the
# vocabulary has no divisor near it (exp_kernel.block_size)
_SAMPLE = 1024  # entries of a strided sample of the row, from which a threshold for ~n candidates is guessed
_TOP_P_FIRST = 256  # top-p first tries about this many of the most likely tokens (enough for a peaked distribution)
_REJECT_FROM = 0.5  # from this top_p on, a draw goes straight to rejection (< 2 tries on average)


def _candidates(x: np.ndarray, n: int) -> np.ndarray:
    """Ids of at least the n largest entries of x (vocab,), usually a few times n, in id order.

    The threshold is guessed from a strided sample (one small partition) and checked (one pass over x); if fewer
    than n entries pass it, every id is a candidate (exact either way, only slower).
    """
    if n * 8 >= x.size:
        return np.arange(x.size)
    stride = max(1, x.size // _SAMPLE)
    sample = x[::stride]  # (~_SAMPLE,) view
    rank = min(sample.size, 2 * -(-n // stride) + 6)  # ~rank * stride entries of x reach the rank-th of the sample
    threshold = np.partition(sample, sample.size - rank)[sample.size - rank]
    ids = np.flatnonzero(x >= threshold)
    return ids if ids.size >= n else np.arange(x.size)


_SORT_FEW = 512  # candidates up to this many are sorted whole for the n largest; more are partitioned first


def _top(x: np.ndarray, n: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n largest entries of x (vocab,): (ids, values), largest first, ties by id. ids: candidates already
    found for at least n (`_candidates`, in id order), else found here."""
    ids = _candidates(x, n) if ids is None else ids
    values = x[ids]
    if ids.size <= _SORT_FEW:  # a few candidates: one stable sort by value (ids ascending: ties by id)
        order = np.argsort(-values, kind="stable")[:n]
        return ids[order], values[order]
    if ids.size > n:
        kth = np.partition(values, ids.size - n)[ids.size - n]  # the n-th largest value
        keep = values > kth
        keep[np.flatnonzero(values == kth)[: n - int(np.count_nonzero(keep))]] = True  # its ties: smallest ids
        ids, values = ids[keep], values[keep]
    order = np.lexsort((ids, -values))
    return ids[order], values[order]


_SORT_MAX = 4096  # a nucleus among more candidates than this is cut by selection on the weights, not by a sort


def _nucleus(kept: np.ndarray, weights: np.ndarray, need: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of the largest weights whose sum reaches `need`, the one crossing it included (ties at the
    cut: the first in `kept`), in kept's order. kept (n,) ids, weights (n,) float64. The set is cut at the crossing
    weight: a few candidates are sorted by value (no index sort), many (a flat distribution: the nucleus can hold
    most of the vocabulary) are narrowed by selection first (`_crossing`)."""
    cut, ties = _crossing(weights, need)
    keep = weights > cut
    if ties:
        keep[np.flatnonzero(weights == cut)[:ties]] = True
    return kept[keep], weights[keep]


def _crossing(weights: np.ndarray, need: float) -> tuple[float, int]:
    """The weight of the token whose addition, in decreasing order, makes the sum reach `need`, and how many
    weights equal to it the nucleus takes. Selection on mass: two pivots from a strided sample bracket the estimated
    crossing; the weights above the upper one are kept (their mass counted), those below the lower one dropped, and
    the few between are sorted. A bracket that misses moves (each pass holds fewer weights); at worst all are
    sorted."""
    rest, above = weights, 0.0  # the weights still in question; the mass of those certainly kept (all larger)
    while rest.size > _SORT_MAX:
        stride = rest.size // _SAMPLE
        sample = np.sort(rest[::stride])[::-1]  # (~_SAMPLE,) descending
        cumulative = np.cumsum(sample)  # the sample's mass, scaled to the mass it stands for
        at = int(np.searchsorted(cumulative * (float(rest.sum()) / cumulative[-1]), need - above))
        high, low = sample[max(at - 12, 0)], sample[min(at + 12, sample.size - 1)]  # ~24 strides of weights apart
        over = rest > high
        over_mass = float(rest[over].sum())
        if above + over_mass >= need:
            rest = rest[over]  # the crossing is above the bracket
            continue
        reach = rest >= low
        reach_mass = float(rest[reach].sum())
        if above + reach_mass < need:
            above, rest = above + reach_mass, rest[~reach]  # below it
            continue
        between = rest[reach & ~over]
        if between.size == rest.size:
            break  # no progress (one value repeated throughout): sort them all
        above, rest = above + over_mass, between
    ordered = np.sort(rest)[::-1]
    n = min(int(np.searchsorted(np.cumsum(ordered) + above, need, side="left")) + 1, ordered.size)
    cut = float(ordered[n - 1])
    return cut, int(np.count_nonzero(ordered[:n] == cut))


def _top_k_filtered(kept: np.ndarray, values: np.ndarray, params: SamplingParams,
                    xmax: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-k candidates (ids in id order, all ties of the k-th included; their penalised logits) -> (kept ids in
    id order, weights float64) after top-p and min-p among them."""
    weights = np.exp((values.astype(np.float64) - xmax) / params.temperature)
    if params.top_p < 1.0:
        kept, weights = _nucleus(kept, weights, params.top_p * weights.sum())  # in kept's (id) order
    if params.min_p > 0:  # relative to the largest weight, which top-p keeps
        keep = weights >= params.min_p * weights.max()
        kept, weights = kept[keep], weights[keep]
    return kept, weights


_NATIVE_MIN_P = 1024  # min-p candidates per row the C pass collects; a row with more takes the one-row path


def _by_candidates(params: SamplingParams, vocab: int) -> bool:
    """Whether a sampled row draws by the C candidate passes (`Sampler._draw_candidate_rows`): top-k up to
    _NATIVE_TOP (with any top-p / min-p), or min-p alone."""
    if 0 < params.top_k < vocab:
        return params.top_k <= _NATIVE_TOP
    return params.min_p > 0 and params.top_p == 1.0


def _draw(weights: np.ndarray, u: float) -> int:
    """Inverse CDF: the index i where u * sum(weights) falls, weights (n,) >= 0 and not all 0."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), weights.size - 1)


def _needs_exp(params: SamplingParams, vocab: int) -> bool:
    """Whether a row's draw or logprobs need exp over its whole vocabulary (the normaliser)."""
    if params.logprobs is not None:
        return True
    if params.greedy or 0 < params.top_k < vocab:
        return False
    return params.top_p < 1.0 or params.min_p == 0  # top-p, or plain temperature; min-p alone needs no normaliser


def _offset(top: float) -> float:
    """What exp(logits / T - offset) subtracts, given the row's largest logits / T: 0 unless exp could overflow or
    underflow (beyond +-60: e**60 keeps the block sums finite), else that largest value."""
    return 0.0 if -60 < top < 60 else top


def _draws_whole(params: SamplingParams, vocab: int) -> bool:
    """Whether a sampled row draws from its whole temperature distribution (`Sampler._draw_whole`): plain
    temperature, or top-p alone by rejection; top-k, min-p and a small top-p find candidates first."""
    return not 0 < params.top_k < vocab and params.min_p == 0 and (params.top_p == 1.0 or
                                                                    params.top_p >= _REJECT_FROM)


def _inside_with_ties(row: np.ndarray, token: int, reaching: float, need: float) -> bool:
    """Whether `token` is inside the nucleus once its ties are counted exactly: of the weights equal to its own,
    only those with a smaller id are ahead of it. `reaching`: the mass of the weights >= its own."""
    w = float(row[token])
    ties = int(np.count_nonzero(row == row[token]))
    return ties > 1 and reaching - w * ties + w * int(np.count_nonzero(row[:token] == row[token])) < need


def _runs(rows: Sequence[int]):
    """(start, stop) of each maximal stretch of rows[start:stop] that is consecutive and increasing."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            yield start, i
            start = i


class Sampler:
    """Samples rows of logits; owns its scratch (a (rows, vocab) float32 block grown to the largest step, one row,
    and the exp kernel's sessions), allocated on first use and kept.

    Make one per decode loop (or per request) and call `sample` once per step for all rows; not thread-safe (the
    scratch is shared by its calls). The distributions are those of `probabilities`: penalties, temperature,
    top_k, top_p, min_p, in that order; top_k == 1 or temperature == 0 is the argmax.
    """

    def __init__(self, vocab_size: int, threads: int = 1):
        self.vocab_size = vocab_size
        self.threads = threads  # of the exp kernel's session (a step's rows are split over them)
        self._kernel: ExpKernel | None = None
        self._exp_rows = np.empty((1, vocab_size), dtype=np.float32)  # the exp kernel works on (rows, vocab)
        self._exp = self._exp_rows[0]  # (vocab,): exp(logits / T - offset) of the current row
        self._exp_at = (self._exp_rows, 0)  # the buffer and row that self._exp is (for the exp kernel)
        self._copy: np.ndarray | None = None  # (vocab,) float32, for logits the sampler may not write
        self._cumulative: np.ndarray | None = None  # block cumsums of _exp when the current row filled it
        self._offset = 0.0  # _exp = exp(logits / T - _offset)
        self._summed = block_size(vocab_size) is not None  # whether the exp kernel sums whole blocks
        self._blk = block_size(vocab_size) or _BLOCK  # the block size of the draws
        self._ones = np.ones(self._blk, dtype=np.float32)  # else block sums as one matrix-vector product (BLAS)
        self._sums_views: dict[tuple[int, int, int], np.ndarray] = {}  # (id(buffer), start, stop) -> block sums
        self._mask: np.ndarray | None = None  # (rows, vocab) float32 0/1, for the mass ahead of a token (top-p)
        self._block_cumulative: np.ndarray | None = None  # (rows, blocks + 1): the block cumsums of a step's rows
        self._row: int | None = None  # the row of self._block the current row's exp is in, if any
        self._ready: float | None = None  # the temperature _exp and _cumulative hold the current row at, if any
        self._found: tuple[int, np.ndarray] | None = None  # (n, _candidates(row, n)) of the current row, if any
        self._block: np.ndarray | None = None  # (rows, vocab) float32: the exp of the rows of a step
        self._lib = native_lib  # the C kernels, or None
        self._addresses: dict[int, tuple[np.ndarray, int]] = {}  # id(scratch) -> (it, its address) for the C calls
        self._scale_offset = np.empty((2, 8), dtype=np.float32)  # the C exp's per-row scales and offsets
        self._top_ids = np.empty(_NATIVE_TOP, dtype=np.int64)  # the C top-k selection's outputs
        self._top_values = np.empty(_NATIVE_TOP, dtype=np.float32)
        self._small: dict[str, np.ndarray] = {}  # `_scratch`: the C calls' per-row inputs and outputs

    def sample(self, logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams],
               rngs: Sequence[np.random.Generator], histories: Sequence[TokenHistory | None] | None = None, *,
               rows: Sequence[int] | None = None) -> tuple[np.ndarray, list[TokenLogprob | None]]:
        """One token for each of `rows` (default: all) of logits (batch, vocab).

        params: one SamplingParams for every row, or one per row; rngs and histories: one per row of logits
        (index = row). Returns the ids (len(rows),) int64 and, per row, a TokenLogprob where its params ask for
        logprobs (else None). Each row draws one rng.random() unless greedy, so a row sampled here gets the token
        it gets sampled alone with the same rng state. The penalties are written into the seen ids of `logits`
        and restored before returning (logits that are read-only or not float32 are copied instead).

        The rows are sampled together: the full-vocabulary passes (penalties, argmax, max, and the exp and block
        sums of the rows that need the whole normaliser) run over runs of consecutive rows at once, the exp on the
        exp kernel's threads; then each row draws on its own.
        """
        rows = list(range(logits.shape[0])) if rows is None else [int(r) for r in rows]
        per = [params if isinstance(params, SamplingParams) else params[row] for row in rows]
        x = logits
        if not (logits.dtype == np.float32 and logits.flags.writeable and logits.ndim == 2):
            x = np.array(logits[rows], dtype=np.float32).reshape(len(rows), -1)  # (n, vocab) copy
            at = list(range(len(rows)))
        else:
            at = rows
        biased = [(row, *_bias_arrays(p)) for row, p in zip(at, per) if p.logit_bias]
        saved = [(row, ids, x[row, ids]) for row, ids, _ in biased]  # fancy indexing: copies
        for row, ids, values in biased:
            x[row, ids] += values
        try:
            restore = self._penalise(x, at, per, [None if histories is None else histories[row] for row in rows])
            try:
                ids, logprobs = self._sample_rows(x, at, per, [rngs[row] for row in rows])
            finally:
                if restore is not None:
                    restore()
        finally:
            for row, bias_ids, original in saved:
                x[row, bias_ids] = original
        return ids, logprobs

    def sample_one(self, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                   history: TokenHistory | None = None) -> int:
        """The token id for one row of logits (vocab,)."""
        return int(self.sample(logits[None], [params], [rng], [history])[0][0])

    def probabilities(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        """The distribution `sample` draws from for logits (vocab,) already penalised: (vocab,) float64, sums to 1."""
        x = self._writable(logits)
        self._ready = None
        p = np.zeros(x.size)
        if params.greedy:
            p[int(np.argmax(x))] = 1.0
            return p
        xmax = float(x.max())
        kept, weights = self._distribution(x, params, xmax)
        if kept is None:
            p[:] = self._exp
            return p / weights[-1]
        p[kept] = weights
        return p / weights.sum()

    # -- one row ------------------------------------------------------------------------------------------------
    def _writable(self, logits: np.ndarray) -> np.ndarray:
        if logits.dtype == np.float32 and logits.flags.writeable:
            return logits
        if self._copy is None:
            self._copy = np.empty(self.vocab_size, dtype=np.float32)
        self._copy[:] = logits
        return self._copy

    def _penalise(self, x: np.ndarray, rows: list[int], params: list[SamplingParams],
                  histories: list[TokenHistory | None]):
        """Write the penalties into the seen ids of the rows of x (n, vocab) at once; returns what puts the
        original values back (or None when no row is penalised). The same float32 arithmetic as `penalised`."""
        hit = [(row, p, h) for row, p, h in zip(rows, params, histories)
               if h is not None and p.penalised and h.ids.size]
        if not hit:
            return None
        if len(hit) == 1 or not x.flags.c_contiguous:  # one row at a time
            saved = [(row, h.ids, x[row, h.ids]) for row, _, h in hit]
            for (row, p, h), (_, seen, original) in zip(hit, saved):
                x[row, seen] = penalised(original, p, h)

            def put_back():
                for row, seen, original in saved:
                    x[row, seen] = original
            return put_back
        flat = x.reshape(-1)  # a view
        sizes = [h.ids.size for _, _, h in hit]
        index = np.concatenate([h.ids + row * x.shape[1] for row, _, h in hit])  # (seen in all rows,)
        original = flat[index]
        values = original
        if any(p.repetition_penalty != 1.0 for _, p, _ in hit):
            rep = np.repeat(np.array([p.repetition_penalty for _, p, _ in hit], dtype=np.float32), sizes)
            values = np.where(values > 0, values / rep, values * rep)
        else:
            values = values.copy()
        if any(p.presence_penalty or p.frequency_penalty for _, p, _ in hit):
            values -= np.concatenate([h.term(p.presence_penalty, p.frequency_penalty) for _, p, h in hit])
        flat[index] = values

        def put_back():
            flat[index] = original
        return put_back

    def _sample_rows(self, x: np.ndarray, rows: list[int], params: list[SamplingParams],
                     rngs: list[np.random.Generator]) -> tuple[np.ndarray, list[TokenLogprob | None]]:
        """The rows of x (n, vocab), already penalised: the shared passes, the draws over the whole temperature
        distribution (plain temperature, top-p by rejection) of all rows at once, then each other row's draw."""
        n, vocab = len(rows), x.shape[1]
        if n == 1 and (params[0].greedy or _draws_whole(params[0], vocab)):
            return self._sample_row(x[rows[0] : rows[0] + 1], params[0], rngs[0])
        ids = np.empty(n, dtype=np.int64)
        logprobs: list[TokenLogprob | None] = [None] * n
        greedy = [i for i, p in enumerate(params) if p.greedy]
        drawn = [i for i, p in enumerate(params) if not p.greedy or p.logprobs is not None]
        maxima = None
        if self._lib is not None and len(rows) > 1 and x.dtype == np.float32 and x.strides[1] == 4:  # one C pass
            # for every row's max and argmax (numpy makes one pass for each, per run of consecutive rows)
            maxima, argmax = self._max_rows(x, rows)
            ids[greedy] = argmax[greedy]
        else:
            for start, stop in _runs([rows[i] for i in greedy]):  # greedy: the argmax of consecutive rows at once
                ids[greedy[start:stop]] = x[rows[greedy[start]] : rows[greedy[stop - 1]] + 1].argmax(axis=1)
        if not drawn:
            return ids, logprobs
        exps = [i for i in drawn if _needs_exp(params[i], vocab)]
        xmax, cumulative, offsets = self._passes(x, [rows[i] for i in drawn], [rows[i] for i in exps],
                                                 [params[i].temperature or 1.0 for i in exps],
                                                 None if maxima is None else maxima[drawn])
        where = {i: k for k, i in enumerate(exps)}
        self._block_cumulative = cumulative
        whole = [i for i in exps if not params[i].greedy and _draws_whole(params[i], vocab)]
        if whole:
            ids[whole] = self._draw_whole([where[i] for i in whole], [params[i].top_p for i in whole],
                                          [rngs[i] for i in whole], cumulative)
        done = set(whole)
        native = self._lib is not None and x.dtype == np.float32 and x.strides[1] == 4
        by_candidates = [i for i in drawn if native and not params[i].greedy and i not in done
                         and _by_candidates(params[i], vocab)]
        if len(by_candidates) > 1:  # top-k / min-p rows: their candidates by one C call, their draws together (one
            # row alone takes its own numpy pass, faster than the batch's fixed cost: the same tokens either way)
            position = {i: j for j, i in enumerate(drawn)}
            ids[by_candidates] = self._draw_candidate_rows(
                x, [rows[i] for i in by_candidates], [params[i] for i in by_candidates],
                np.array([xmax[position[i]] for i in by_candidates], dtype=np.float64),
                [rngs[i] for i in by_candidates])
            done.update(by_candidates)
        own = self._exp
        try:
            for j, i in enumerate(drawn):
                p = params[i]
                if i in done and p.logprobs is None:
                    continue
                row, top, k = x[rows[i]], float(xmax[j]), where.get(i)
                self._found = None
                if k is not None:  # this row's exp is in the block: the row's passes use it
                    self._exp, self._cumulative, self._offset = self._block[k], cumulative[k], offsets[k]
                    self._exp_at, self._ready, self._row = (self._block, k), p.temperature or 1.0, k
                if not p.greedy and i not in done:
                    ids[i] = self._draw(row, p, top, rngs[i])
                if p.logprobs is not None:
                    logprobs[i] = self._logprob(row, p, int(ids[i]), top)
                self._exp, self._exp_at, self._ready, self._row = own, (self._exp_rows, 0), None, None
        finally:
            self._exp, self._exp_at, self._ready, self._row = own, (self._exp_rows, 0), None, None
        return ids, logprobs

    def _sample_row(self, x: np.ndarray, params: SamplingParams,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[TokenLogprob | None]]:
        """The common step of one request, greedy or drawn from the whole temperature distribution, with or
        without logprobs: what the general path does for it (the same passes, draw and logprob arithmetic), with
        fewer Python steps."""
        if params.greedy and params.logprobs is None:
            return x.argmax(axis=1), [None]
        if self._block is None:
            self._block = np.empty((8, x.shape[1]), dtype=np.float32)
        t = params.temperature or 1.0
        scale = 1.0 / t
        top = float(x.max()) * scale
        offset = _offset(top)
        cumulative = np.empty((1, x.shape[1] // self._blk + 1))
        self._exp_into(x, [scale], [offset], self._block, 0, 1, cumulative)
        if params.greedy:
            ids = x.argmax(axis=1)
        else:
            ids = self._draw_whole([0], [params.top_p], [rng], cumulative)
        if params.logprobs is None:
            return ids, [None]
        row, token = x[0], int(ids[0])
        shift = t * (offset + math.log(cumulative[0, -1]))  # log-softmax(x / t) = (x - shift) / t
        top_ids, top_values = self._top(row, params.logprobs) if params.logprobs else ((), ())
        alternatives = tuple(zip(np.asarray(top_ids).tolist(), ((np.asarray(top_values, dtype=np.float64) - shift)
                                                                  / t).tolist()))
        return ids, [TokenLogprob(token, (float(row[token]) - shift) / t, alternatives)]

    def _draw_whole(self, ks: list[int], top_p: list[float], rngs: list[np.random.Generator],
                    cumulative: np.ndarray, first: list[float] | None = None) -> np.ndarray:
        """One draw for each row ks of self._block (its exp, `cumulative` its block cumsums) from the whole
        temperature distribution, kept when inside the row's nucleus (top_p < 1; see `_draw_top_p`), else drawn
        again: each row takes rng.random() for its first try (or `first`) and one more per rejection, so it draws
        the same alone as among others. The tries of all pending rows run together. A row whose total is not a
        positive finite number (NaN or infinite logits) takes the id of its largest weight."""
        if len(ks) == 1:  # one row: the same arithmetic in scalar steps (fewer numpy calls)
            k, cum, rng = ks[0], cumulative[ks[0]], rngs[0]
            need = top_p[0] * cum[-1]
            u = first[0] if first is not None else rng.random()
            if not 0 < cum[-1] < math.inf:  # no mass to draw from (non-finite logits): the row's largest weight
                return np.array([int(self._block[k].argmax())], dtype=np.int64)
            while True:
                token = self._invert_one(k, u, cum)
                if top_p[0] >= 1.0 or self._inside_one(k, token, need):
                    return np.array([token], dtype=np.int64)
                u = rng.random()
        if self._lib is not None and cumulative.flags.c_contiguous:
            return self._draw_whole_native(ks, top_p, rngs, cumulative, first)
        ks_all = np.asarray(ks, dtype=np.intp)
        tops = np.asarray(top_p, dtype=np.float64)
        needs = tops * cumulative[ks_all, -1]
        us = np.array(first if first is not None else [rng.random() for rng in rngs], dtype=np.float64)
        out = np.empty(ks_all.size, dtype=np.int64)
        totals = cumulative[ks_all, -1]
        bad = ~((totals > 0) & (totals < math.inf))  # no mass to draw from (non-finite logits): the largest weight
        out[bad] = self._block[ks_all[bad]].argmax(axis=1)
        pending = np.flatnonzero(~bad)
        while pending.size:
            tokens = np.array([self._invert_one(int(ks_all[j]), float(us[j]), cumulative[ks_all[j]])
                               for j in pending.tolist()], dtype=np.int64)
            keep = np.ones(pending.size, dtype=bool)
            checked = np.flatnonzero(tops[pending] < 1.0)
            if checked.size:
                keep[checked] = self._inside(ks_all[pending[checked]], tokens[checked], needs[pending[checked]])
            out[pending[keep]] = tokens[keep]
            pending = pending[~keep]
            for j in pending.tolist():
                us[j] = rngs[j].random()
        return out

    def _draw_whole_native(self, ks: list[int], top_p: list[float], rngs: list[np.random.Generator],
                           cumulative: np.ndarray, first: list[float] | None) -> np.ndarray:
        """`_draw_whole` for several rows by the C draws: each try of every pending row (its inverse CDF and its
        top-p check, ties by id) in one call, split over the threads; the same rng use and decisions."""
        e, vocab, m = self._block, self.vocab_size, len(ks)
        io, at = self._scratch("draw", 5, m)  # (5, capacity) int64: ks, us, needs (float64), tokens, kept
        ks_all = np.asarray(ks, dtype=np.int64)
        totals = cumulative[ks_all, -1]
        tops = np.asarray(top_p, dtype=np.float64)
        needs = np.where(tops < 1.0, tops * totals, -1.0)  # -1: always kept
        us = np.array(first if first is not None else [rng.random() for rng in rngs], dtype=np.float64)
        out = np.empty(m, dtype=np.int64)
        bad = ~((totals > 0) & (totals < math.inf))  # no mass to draw from (non-finite logits): the largest weight
        if bad.any():
            out[bad] = e[ks_all[bad]].argmax(axis=1)
        pending = np.flatnonzero(~bad)
        floats, row = io.view(np.float64), io.strides[0]
        while pending.size:
            n = pending.size
            io[0, :n], floats[1, :n], floats[2, :n] = ks_all[pending], us[pending], needs[pending]
            threads = 1 if n * vocab < _SPLIT_FROM else self.threads
            self._lib.fl_draw_rows(self._address(e), e.strides[0] // 4, cumulative.ctypes.data,
                                   cumulative.strides[0] // 8, at, at + row, at + 2 * row, n, vocab, self._blk,
                                   at + 3 * row, at + 4 * row, threads)
            kept = io[4, :n] != 0
            out[pending[kept]] = io[3, :n][kept]
            pending = pending[~kept]
            for j in pending.tolist():
                us[j] = rngs[j].random()
        return out

    def _draw_candidate_rows(self, x: np.ndarray, rows: list[int], params: list[SamplingParams], xmax: np.ndarray,
                             rngs: list[np.random.Generator]) -> np.ndarray:
        """The draws of rows of x (penalised) whose filter is top-k (<= _NATIVE_TOP) or min-p alone, as `_draw` makes
        them one row at a time (one rng.random() each; the same candidates, weights and inverse CDF): the candidates
        of all rows by one C call per filter (split over the threads), then the weights, min-p and the draws of all
        rows at once (zero weights where a row has fewer candidates: the same running sums). A row with top-p takes
        `_top_k_filtered` on its candidates; one whose candidates the C pass cannot give (more ties of the k-th
        than it keeps, more than _NATIVE_MIN_P above min-p) takes `_distribution`."""
        m, vocab = len(rows), x.shape[1]
        us = np.array([rng.random() for rng in rngs])
        out = np.empty(m, dtype=np.int64)
        io, at = self._scratch("candidates", 3, m)  # (3, capacity) int64: rows, ks or thresholds (float32), counts
        step = io.strides[0]
        threads = 1 if m * vocab < _SPLIT_FROM else self.threads
        top_k = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
        min_p = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab]
        for group in (top_k, min_p):
            if not group:
                continue
            g = len(group)
            io[0, :g] = [rows[j] for j in group]
            if group is top_k:
                ks = np.array([params[j].top_k for j in group])
                width = int(ks.max())
                found = np.zeros((g, width), dtype=np.int64)  # ids, largest first, ties by id
                values = np.zeros((g, width), dtype=np.float32)
                io[1, :g] = ks
                self._lib.fl_top_rows(x.ctypes.data, x.strides[0] // 4, at, g, vocab, at + step, width,
                                      found.ctypes.data, values.ctypes.data, at + 2 * step, threads)
                exact = io[2, :g] != 0
                valid = np.arange(width) < ks[:, None]
                order = np.argsort(np.where(valid, found, vocab), axis=1, kind="stable")  # to id order
                found, values = np.take_along_axis(found, order, 1), np.take_along_axis(values, order, 1)
                valid = np.take_along_axis(valid, order, 1)
            else:
                thresholds = io[1].view(np.float32)  # as numpy compares float32 logits with a Python float
                thresholds[:g] = [xmax[j] + params[j].temperature * math.log(params[j].min_p) for j in group]
                width = _NATIVE_MIN_P
                found = np.zeros((g, width), dtype=np.int64)  # ids at or above the threshold, in id order
                self._lib.fl_at_least_rows(x.ctypes.data, x.strides[0] // 4, at, g, vocab, at + step, width,
                                           found.ctypes.data, at + 2 * step, threads)
                counts = io[2, :g].copy()
                exact = (counts <= width) & (counts > 0)  # none: NaN logits (the one-row path copes)
                width = int(max(1, min(counts.max(), width)))
                found = found[:, :width]
                valid = np.arange(width) < counts[:, None]
                found[~valid] = 0
                values = x[np.array([rows[j] for j in group])[:, None], found]
            t = np.array([params[j].temperature for j in group])[:, None]
            weights = np.exp((values.astype(np.float64) - xmax[group][:, None]) / t)  # (g, width)
            candidates = valid.copy()
            if group is top_k:  # min-p relative to the largest weight (0: keeps all)
                lowest = np.array([params[j].min_p for j in group])[:, None] * \
                    np.where(valid, weights, -np.inf).max(axis=1, keepdims=True)
                valid &= weights >= lowest
            running = np.cumsum(np.where(valid, weights, 0.0), axis=1)  # (g, width): the kept ones' running sums
            drawn = np.count_nonzero(running <= us[group][:, None] * running[:, -1:], axis=1)
            last = width - 1 - np.argmax(valid[:, ::-1], axis=1)  # u * total past the end: the last kept
            tokens = found[np.arange(g), np.where(drawn >= width, last, np.minimum(drawn, width - 1))]
            for r, j in enumerate(group):
                p = params[j]
                if not exact[r]:
                    kept, weights_j = self._distribution(x[rows[j]], p, float(xmax[j]))
                elif group is top_k and p.top_p < 1.0:
                    kept, weights_j = _top_k_filtered(found[r][candidates[r]], values[r][candidates[r]], p,
                                                      float(xmax[j]))
                else:
                    out[j] = tokens[r]
                    continue
                out[j] = int(kept[_draw(weights_j, float(us[j]))])
        return out

    def _max_rows(self, x: np.ndarray, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The largest value (float32) and its first id (int64) of each of `rows` of x, as numpy's max and argmax
        (NaN first), by the C pass split over the threads for a large step."""
        n = len(rows)
        io, at = self._scratch("max", 3, n)  # (3, capacity) int64: rows, maxima (float32), argmax
        io[0, :n] = rows
        threads = 1 if n * x.shape[1] < _SPLIT_FROM else self.threads
        self._lib.fl_max_rows(x.ctypes.data, x.strides[0] // 4, at, n, x.shape[1], at + io.strides[0],
                              at + 2 * io.strides[0], threads)
        return io[1].view(np.float32)[:n].copy(), io[2, :n].copy()

    def _scratch(self, name: str, fields: int, n: int) -> tuple[np.ndarray, int]:
        """A (fields, >= n) int64 scratch array of the C calls' small inputs and outputs, and its address."""
        io = self._small.get(name)
        if io is None or io.shape[1] < n:
            io = self._small[name] = np.zeros((fields, max(n, 16)), dtype=np.int64)
        return io, self._address(io)

    def _invert_one(self, k: int, u: float, cumulative: np.ndarray) -> int:
        """Inverse CDF over the exp of row k of self._block: the block where u * total falls from the block cumsums
        `cumulative` (blocks + 1,), then the id inside it from a cumsum of that block. (A gather of every pending
        row's block for one vectorised cumsum costs more than this loop at up to 16 rows.)"""
        target = u * cumulative[-1]
        block = min(int(cumulative.searchsorted(target, side="right")), cumulative.size - 1)
        while block > 0 and cumulative[block] == cumulative[block - 1]:  # an empty block (rounding at the end)
            block -= 1
        segment = self._block[k, block * self._blk : (block + 1) * self._blk]
        before = cumulative[block - 1] if block else 0.0
        if self._lib is not None:  # the same running float64 sum and search in one C loop
            at = self._lib.fl_search(self._address(self._block) + (k * self.vocab_size + block * self._blk) * 4,
                                     segment.size, target - before)
        else:
            at = int(segment.cumsum(dtype=np.float64).searchsorted(target - before, side="right"))
        if at >= segment.size:  # rounding past the block's end: its last likely token
            at = int(np.flatnonzero(segment)[-1])
        return block * self._blk + at

    def _inside_one(self, k: int, token: int, need: float) -> bool:
        """`_inside` for the one row k of self._block, the same arithmetic in fewer numpy calls."""
        row = self._block[k]
        w = row[token]
        if self._lib is not None:  # the same decision, ties included, in one C pass
            return bool(self._lib.fl_inside(self._address(self._block) + k * row.strides[0], row.size, token, need))
        if self._mask is None or self._mask.shape[0] < self._block.shape[0]:
            self._mask = np.empty_like(self._block)
        mask = self._mask[0]
        np.greater_equal(row, w, out=mask, casting="unsafe")
        reaching = np.matmul(row[None, None, :], mask[None, :, None])[0, 0, 0]  # as `_inside` computes it
        return float(reaching) - float(w) < need or _inside_with_ties(row, token, float(reaching), need)

    def _inside(self, ks: np.ndarray, tokens: np.ndarray, needs: np.ndarray) -> np.ndarray:
        """Whether each token is inside its row's nucleus: the mass of the row's exp ahead of it in decreasing order
        (larger weights, then equal ones with a smaller id) is below `need`. Per row one compare and one float32
        dot product over the vocabulary (consecutive rows in one call each); ties are counted only where the bound
        that includes all of them does not already put the token inside."""
        e = self._block
        weights = e[ks, tokens]  # (m,)
        reaching = np.empty(ks.size, dtype=np.float32)  # the token, its ties and everything larger
        if self._mask is None or self._mask.shape[0] < self._block.shape[0]:
            self._mask = np.empty_like(self._block)
        for start, stop in _runs(ks.tolist()):
            lo, hi = int(ks[start]), int(ks[stop - 1]) + 1
            mask = self._mask[: hi - lo]
            np.greater_equal(e[lo:hi], weights[start:stop, None], out=mask, casting="unsafe")
            np.matmul(e[lo:hi, None, :], mask[:, :, None], out=reaching[start:stop, None, None])
        ahead = reaching.astype(np.float64) - weights  # an upper bound of the mass ahead (ties after it included)
        inside = ahead < needs
        for j in np.flatnonzero(~inside).tolist():
            inside[j] = _inside_with_ties(e[ks[j]], int(tokens[j]), float(reaching[j]), needs[j])
        return inside

    def _passes(self, x: np.ndarray, maxed: list[int], exps: list[int], temperatures: list[float],
                xmax: np.ndarray | None = None) -> tuple:
        """The full-vocabulary passes of a step over several rows: the max of the rows `maxed` of x (penalised),
        and for the rows `exps` (with their temperatures) exp(x / T - offset) into self._block, as `_exp_row`
        computes it for one row, its block cumsums and the offsets. One numpy max per run of consecutive rows (or
        `xmax` given), one exp kernel call (multiply, exp, block sums; the rows split over its threads) per run."""
        vocab = x.shape[1]
        n = len(exps)
        if self._block is None or self._block.shape[0] < n:
            self._block = np.empty((max(n, 8), vocab), dtype=np.float32)  # (rows, vocab), grown rarely
        if xmax is not None:
            pass
        elif len(maxed) == 1:  # one row: fewer numpy calls
            xmax = np.array([x[maxed[0]].max()], dtype=np.float32)
        else:
            xmax = np.empty(len(maxed), dtype=np.float32)  # (rows,)
            for start, stop in _runs(maxed):
                np.max(x[maxed[start] : maxed[stop - 1] + 1], axis=1, out=xmax[start:stop])
        if not n:
            return xmax, None, None
        at = {row: j for j, row in enumerate(maxed)}
        scales = [1.0 / t for t in temperatures]
        offsets = [_offset(float(xmax[at[row]]) * scale) for row, scale in zip(exps, scales)]
        cumulative = np.empty((n, vocab // self._blk + 1))  # (n, blocks + 1) float64
        for start, stop in _runs(exps):
            self._exp_into(x[exps[start] : exps[stop - 1] + 1], scales[start:stop], offsets[start:stop],
                           self._block, start, stop, cumulative[start:stop])
        return xmax, cumulative, offsets

    def _exp_into(self, x: np.ndarray, scales: list[float], offsets: list[float], buffer: np.ndarray, start: int,
                  stop: int, cumulative: np.ndarray) -> None:
        """buffer[start:stop] = exp(x * scale - offset) for the rows x (stop - start, vocab), and `cumulative`
        (stop - start, blocks + 1) float64 = their block cumsums (the last entry the normaliser). The exp kernel
        multiplies, exponentiates and sums the blocks in one call; rows with an offset (rare) are shifted here.
        The C kernel (where built) does all of it, the running sums included, in one pass per row."""
        if self._lib is not None and x.dtype == np.float32 and x.strides[1] == 4:
            rows, so = stop - start, self._scale_offset
            if so.shape[1] < rows:
                so = self._scale_offset = np.empty((2, rows), dtype=np.float32)
            so[0, :rows], so[1, :rows] = scales, offsets
            scale_at = self._address(so)
            threads = 1 if rows * x.shape[1] < _SPLIT_FROM else self.threads  # as the ONNX Runtime kernel splits
            self._lib.fl_exp_rows(x.ctypes.data, x.strides[0] // 4, self._address(buffer) + start * buffer.strides[0],
                                  buffer.strides[0] // 4, rows, x.shape[1], scale_at, scale_at + so.strides[0],
                                  self._blk, cumulative.ctypes.data, threads)
            return
        kernel, blocks = self._exp_kernel(), x.shape[1] // self._blk
        sums = None
        if self._summed:
            key = (id(buffer), start, stop)
            if key not in self._sums_views:
                self._sums_views[key] = np.empty((stop - start, blocks), dtype=np.float32)
            sums = self._sums_views[key]
        if not any(offsets) and x.dtype == np.float32 and x.flags.c_contiguous:
            kernel.scaled(x, scales[0] if len(scales) == 1 else scales, buffer, start, stop, sums)
        else:
            e = buffer[start:stop]
            np.multiply(x, np.array(scales, dtype=np.float32)[:, None], out=e)
            for k, offset in enumerate(offsets):
                if offset:
                    np.subtract(e[k], np.float32(offset), out=e[k])
            kernel.in_place(buffer, start, stop, sums)
        if sums is not None:
            cumulative[:, :blocks] = sums
            cumulative[:, blocks] = 0.0
        else:  # blocks of _BLOCK and a short last one
            e = buffer[start:stop]
            cumulative[:, :blocks] = np.matmul(e[:, : blocks * self._blk].reshape(stop - start, blocks, self._blk),
                                               self._ones)
            cumulative[:, blocks] = e[:, blocks * self._blk :].sum(axis=1)
        cumulative.cumsum(axis=1, out=cumulative)

    def _address(self, scratch: np.ndarray) -> int:
        """The address of one of the sampler's own buffers (looked up once; they live as long as the sampler)."""
        known = self._addresses.get(id(scratch))
        if known is None or known[0] is not scratch:
            if len(self._addresses) > 16:  # buffers grown since: let the old ones go
                self._addresses.clear()
            known = self._addresses[id(scratch)] = (scratch, scratch.ctypes.data)
        return known[1]

    def _top(self, x: np.ndarray, n: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`_top(x, n, ids)`: by the C selection (one pass over x) where it is built and n is small."""
        if self._lib is None or n > _NATIVE_TOP or x.dtype != np.float32 or x.strides[0] != 4:
            return _top(x, n, ids)
        got = self._lib.fl_top(x.ctypes.data, x.size, n, self._address(self._top_ids), self._address(self._top_values))
        if got < n:  # fewer than n entries above -inf (NaN never counts): numpy's order for the rest
            return _top(x, n, ids)
        return self._top_ids[:n].copy(), self._top_values[:n].copy()

    def _exp_kernel(self) -> ExpKernel:
        """The exp kernel's session, made on first use (greedy decoding never needs it)."""
        if self._kernel is None:
            self._kernel = ExpKernel(self.vocab_size, self.threads)
        return self._kernel

    def _candidates(self, x: np.ndarray, n: int) -> np.ndarray:
        """`_candidates(x, n)`, kept for the logprobs of the same row (see `_logprob`)."""
        self._found = (n, _candidates(x, n))
        return self._found[1]

    def _draw(self, x: np.ndarray, params: SamplingParams, xmax: float, rng: np.random.Generator) -> int:
        """One draw for x (vocab,) penalised, temperature > 0, by a filter that needs its own candidates (top-k,
        min-p, a small top-p); the draws over the whole distribution are `_draw_whole`'s."""
        u = rng.random()
        if params.top_p < 1.0 and not 0 < params.top_k < x.size and params.min_p == 0:
            return self._draw_top_p(x, params, xmax, u, rng)
        kept, weights = self._distribution(x, params, xmax)
        return int(kept[_draw(weights, u)])

    def _distribution(self, x: np.ndarray, params: SamplingParams, xmax: float) -> tuple:
        """What a draw needs for x (vocab,) penalised, temperature > 0: (kept ids in increasing order, their
        weights (float64)), or (None, block cumsums) to draw over the whole vocabulary from self._exp."""
        t = params.temperature
        if 0 < params.top_k < x.size:  # the k largest (all ties of the k-th), then top-p and min-p among them
            kept = self._candidates(x, params.top_k)
            values = x[kept]
            if kept.size > params.top_k:
                kth = np.partition(values, kept.size - params.top_k)[kept.size - params.top_k]
                kept, values = kept[values >= kth], values[values >= kth]
            return _top_k_filtered(kept, values, params, xmax)
        if params.top_p < 1.0:  # the cut needs the whole normaliser: one exp over the vocabulary
            need = params.top_p * self._exp_row(x, xmax, t)[-1]
            if params.min_p > 0:  # the nucleus is inside min-p's set or contains it: start from that set
                kept = np.flatnonzero(x >= xmax + t * math.log(params.min_p))
                weights = self._exp[kept].astype(np.float64)
                if weights.sum() < need:
                    return kept, weights  # top-p would keep more than min-p allows
            else:
                kept, weights = self._reaching(x, need)
            kept, weights = _nucleus(kept, weights, need)
        elif params.min_p > 0:
            kept = np.flatnonzero(x >= xmax + t * math.log(params.min_p))
            return kept, np.exp((x[kept].astype(np.float64) - xmax) / t)
        else:
            return None, self._exp_row(x, xmax, t)  # plain temperature: over the whole vocabulary
        if params.min_p > 0:  # relative to the largest weight, which every filter keeps
            keep = weights >= params.min_p * weights.max()
            kept, weights = kept[keep], weights[keep]
        if kept.size > 1 and np.any(kept[1:] < kept[:-1]):  # draw in id order, as over the whole vocabulary
            order = np.argsort(kept)
            kept, weights = kept[order], weights[order]
        return kept, weights

    def _draw_top_p(self, x: np.ndarray, params: SamplingParams, xmax: float, u: float,
                    rng: np.random.Generator) -> int:
        """A draw from the nucleus of x (vocab,) penalised, top-p alone, with top_p below _REJECT_FROM (the rest are
        drawn by `_draw_whole`): first the ~_TOP_P_FIRST most likely tokens, cut and drawn from as `_distribution`
        does (a peaked distribution's nucleus is among them, which saves the many rejections a small top_p would
        take); if they hold less than the nucleus's mass, rejection as `_draw_whole` draws, starting from u."""
        cumulative = self._exp_row(x, xmax, params.temperature)
        need = params.top_p * float(cumulative[-1])
        kept = self._candidates(x, _TOP_P_FIRST)
        weights = self._exp[kept].astype(np.float64)
        if weights.sum() >= need:
            kept, weights = _nucleus(kept, weights, need)  # in id order, as `_distribution` draws
            return int(kept[_draw(weights, u)])
        return int(self._draw_whole([self._row], [params.top_p], [rng], self._block_cumulative, first=[u])[0])

    def _reaching(self, x: np.ndarray, need: float) -> tuple[np.ndarray, np.ndarray]:
        """Candidates for a nucleus: ids (and weights from self._exp) holding every token above some weight and a
        mass >= need. First the ~_TOP_P_FIRST most likely; if they fall short, the rest of the mass is estimated
        from a strided sample of the weights below them, and the guess checked; at worst the whole vocabulary."""
        e = self._exp
        kept = self._candidates(x, _TOP_P_FIRST)
        weights = e[kept].astype(np.float64)
        mass = weights.sum()
        if mass >= need:
            return kept, weights
        stride = max(1, x.size // _SAMPLE)
        below = np.sort(e[::stride])
        below = below[: np.searchsorted(below, weights.min(), side="left")][::-1]  # (m,) descending
        at = int(np.searchsorted(np.cumsum(below, dtype=np.float64) * stride, need - mass))
        while at < below.size:  # the estimate of a heavy tail is noisy: go deeper until the mass is there
            at = min(below.size - 1, at + at // 2 + 4)
            kept = np.flatnonzero(e >= below[at])
            weights = e[kept].astype(np.float64)
            if weights.sum() >= need:
                return kept, weights
            at = below.size if at == below.size - 1 else 2 * at
        return np.arange(x.size), e.astype(np.float64)

    def _exp_row(self, x: np.ndarray, xmax: float, temperature: float) -> np.ndarray:
        """self._exp = exp(x / temperature - self._offset) (float32, in place; offset 0 unless exp could overflow
        or underflow, else xmax / temperature); returns its block cumsums (float64), the last the normaliser."""
        if self._ready == temperature:  # computed with the other rows of the step
            return self._cumulative
        scale = 1.0 / temperature
        self._offset = _offset(xmax * scale)
        buffer, row = self._exp_at
        cumulative = np.empty((1, x.size // self._blk + 1))
        self._exp_into(x[None], [scale], [self._offset], buffer, row, row + 1, cumulative)
        self._cumulative = cumulative[0]
        self._ready = temperature
        return self._cumulative

    def _logprob(self, x: np.ndarray, params: SamplingParams, token: int, xmax: float | None) -> TokenLogprob:
        """log-softmax(x / T) at the token and the params.logprobs largest (T = 1 when greedy at temperature 0),
        reusing the row's exp pass when the draw made one (at the same temperature)."""
        t = params.temperature or 1.0
        if xmax is None:
            xmax = float(x.max())
        cumulative = self._exp_row(x, xmax, t)
        shift = t * (self._offset + math.log(cumulative[-1]))  # log-softmax(x / t) = (x - shift) / t
        found = self._found[1] if self._found is not None and self._found[0] >= params.logprobs else None
        top_ids, top_values = self._top(x, params.logprobs, found) if params.logprobs else ((), ())
        return TokenLogprob(token, (float(x[token]) - shift) / t,
                            tuple((int(i), (float(v) - shift) / t) for i, v in zip(top_ids, top_values)))


_local = threading.local()  # one Sampler per thread and vocabulary size, for the functions below


def _sampler(vocab_size: int) -> Sampler:
    samplers = _local.__dict__.setdefault("samplers", {})
    if vocab_size not in samplers:
        samplers[vocab_size] = Sampler(vocab_size)
    return samplers[vocab_size]


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from, after temperature, top_k, top_p and min_p (float64, sums to 1)."""
    return _sampler(logits.shape[-1]).probabilities(logits, params)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           history: TokenHistory | None = None) -> int:
    """logits: (vocab,) for one sequence. Returns the chosen token id (see Sampler for a batch and logprobs)."""
    return _sampler(logits.shape[-1]).sample_one(logits, params, rng, history)

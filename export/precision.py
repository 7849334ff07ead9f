"""The precisions a model can be exported in, defined once, and the options of a quantized export.

Everything that offers or checks a precision reads `PRECISIONS`: the export pipeline, quantization, the CLI's
choices and help, the bench. The runtime reads precision names from the manifest (fastllm/manifest.py keeps its own
list, as it may not import this package; tests/test_structure.py checks that the two agree).

Pure Python, no torch or onnx: the CLI builds its parser from this module before any export runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastllm.errors import ExportError


@dataclass(frozen=True)
class Precision:
    name: str
    bits: int  # of each weight
    purpose: str  # for --help
    tolerance: float | None = None  # verification against PyTorch: max |Δlogits| / max(1, max |logit|)
    methods: tuple[str, ...] = ()  # quantization methods, the default first; none: the graph is traced in it
    block_size: int | None = None  # default weights per scale (weight-only)
    # the quality gate's defaults (export/quality.py gate; the measurements behind them are noted there):
    max_ppl_increase: float | None = None  # relative perplexity increase allowed, measured on text
    max_ppl_increase_self_generated: float | None = None  # the same on sequences the fp32 model sampled itself
    max_kl: float | None = None  # mean KL(fp32 || quantized) of next-token distributions
    min_agreeing_prefix: float | None = None  # mean count of greedy tokens identical to fp32's before they differ

    @property
    def quantized(self) -> bool:
        """Quantized from an fp32 graph, judged by a quality report against it (not by a tolerance)."""
        return bool(self.methods)


# Block sizes chosen by measurement (smollm2-135m shape, 2 threads, TPOT): int4 symmetric blocks of 32 with int8
# compute 5.4 ms (asymmetric 6.6, fp32 compute 10.1); int8 blocks of 128 with int8 compute 8.4 ms (blocks of 32:
# 9.2; fp32 compute: 213).
PRECISIONS = {p.name: p for p in (
    Precision("fp32", 32, "CPU (default)", tolerance=1e-4),
    Precision("fp16", 16, "for CUDA (weights, activations and KV cache in float16, logits float32)",
              tolerance=1e-2),
    Precision("int8", 8, "weight-only or dynamic int8", methods=("weight-only", "dynamic"), block_size=128,
              max_ppl_increase=0.01, max_ppl_increase_self_generated=0.03, max_kl=0.02, min_agreeing_prefix=4.0),
    Precision("int4", 4, "weight-only int4", methods=("weight-only",), block_size=32, max_ppl_increase=0.05,
              max_ppl_increase_self_generated=0.15, max_kl=0.25, min_agreeing_prefix=1.0),
)}
QUANTIZED = tuple(name for name, p in PRECISIONS.items() if p.quantized)
METHODS = tuple(dict.fromkeys(m for p in PRECISIONS.values() for m in p.methods))
# what --mixed may keep the most sensitive MatMuls in: a weight-only precision above the lowest one, or fp32
KEEP = tuple(sorted((name for name, p in PRECISIONS.items() if (name == "fp32" or "weight-only" in p.methods)
                     and p.bits > min(PRECISIONS[q].bits for q in QUANTIZED)), key=lambda name: PRECISIONS[name].bits))


def fit_block(block: int, k: int) -> int:
    """The block size used on a matrix whose rows (the dot-product axis) have k values: `block` halved while it is
    longer than a row, down to 16. A block past the row's end is padding, stored and computed for nothing (int8's
    blocks of 128 on a hidden size of 64 were half padding: 16 bits per weight)."""
    while block > 16 and block > k:
        block //= 2
    return block


# what --prefill may build the prompt graph in (precision, method): kernels that are fast at many rows per call
PREFILL = {"int8-dynamic": ("int8", "dynamic"), "fp32": ("fp32", None)}


def variants() -> dict[str, tuple[str, str]]:
    """Each quantized precision and method under one name, the default method bare: {"int8": ("int8",
    "weight-only"), "int8-dynamic": ("int8", "dynamic"), "int4": ("int4", "weight-only")}."""
    return {p.name if m == p.methods[0] else f"{p.name}-{m}": (p.name, m)
            for p in PRECISIONS.values() for m in p.methods}


@dataclass(frozen=True)
class QuantOptions:
    precision: str  # one of QUANTIZED
    method: str | None = None  # None: the precision's default (its first method)
    block_size: int | None = None  # None: the precision's default
    symmetric: bool = True
    accuracy_level: int = 4  # 4: int8 compute (VNNI / AMX on x86), 0: fp32 compute
    # weight-only, symmetric (None: on there, off elsewhere): each block's scale fitted by weighted least squares
    # (export/blockwise.py; False: ONNX Runtime's round-to-nearest), and activation-aware scaling from calibration
    # text (export/activation_scaling.py), which also weighs the fit's error
    fit_scales: bool | None = None
    activation_aware: bool | None = None
    lm_head: bool = True  # quantize the LM head too
    embedding: bool = True  # quantize the embedding lookup (shares the LM head's bytes when tied)
    mixed: str | None = None  # one of KEEP: keep the most sensitive MatMuls there to meet the budget
    # a second graph for prompt chunks, sharing the KV cache: one of PREFILL ("int8-dynamic" or "fp32"), whose
    # kernels are faster than MatMulNBits' at many rows (TTFT), while decode steps keep the smaller weights
    prefill: str | None = None
    # quality gate limits; None: the precision's defaults (Precision.max_ppl_increase, ...)
    max_ppl_increase: float | None = None
    max_kl: float | None = None
    min_agreeing_prefix: float | None = None

    def __post_init__(self):
        for name in ("max_ppl_increase", "max_kl", "min_agreeing_prefix"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0):
                raise ExportError(f"{name} must be a number >= 0, got {value!r}")
        if self.precision not in QUANTIZED:
            raise ExportError(f"precision must be one of {', '.join(QUANTIZED)} for quantization, "
                              f"got {self.precision!r}")
        spec = PRECISIONS[self.precision]
        if self.method is None:
            object.__setattr__(self, "method", spec.methods[0])
        if self.method not in spec.methods:
            raise ExportError(f"method {self.method!r} is not available for {self.precision}; choose one of "
                              f"{', '.join(spec.methods)}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", spec.block_size)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level must be 0-4, got {self.accuracy_level}")
        if self.mixed is not None:
            higher = [k for k in KEEP if PRECISIONS[k].bits > spec.bits]
            if self.mixed not in higher:
                raise ExportError(f"--mixed keeps sensitive MatMuls at a higher precision than {self.precision}: "
                                  f"choose {' or '.join(higher)}, got {self.mixed!r}")
            if self.method != "weight-only":
                raise ExportError("--mixed works with weight-only quantization, not --method dynamic")
        for name, flag in (("fit_scales", "--rtn"), ("activation_aware", "--no-activation-aware")):
            value = getattr(self, name)
            applies = self.method == "weight-only" and self.symmetric
            if value is not None and not applies:
                raise ExportError(f"{flag} ({name}) applies to symmetric weight-only quantization, not "
                                  f"{'--method dynamic' if self.method != 'weight-only' else '--asymmetric'}")
            object.__setattr__(self, name, applies if value is None else bool(value))
        if self.prefill is not None:
            if self.prefill not in PREFILL:
                raise ExportError(f"--prefill takes {' or '.join(PREFILL)}, got {self.prefill!r}")
            if self.method != "weight-only":
                raise ExportError(f"--prefill {self.prefill} adds a prompt graph beside a weight-only one; a "
                                  f"{self.method} model prefills with its own kernels already")

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision].bits

    @property
    def budget(self) -> float:
        return PRECISIONS[self.precision].max_ppl_increase if self.max_ppl_increase is None else self.max_ppl_increase

"""`fastllm export SRC OUT`: registered through the `fastllm.commands` entry point (the runtime never imports it)."""

from __future__ import annotations

import sys
from pathlib import Path

from fastllm.cli import UsageError
from fastllm.errors import FastLLMError
from fastllm.export.precision import KEEP, METHODS, PRECISIONS, PREFILL, QUANTIZED, QuantOptions


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a Hugging Face model directory to a verified fastllm model",
                              description="Export SRC (a local Hugging Face model directory) to OUT: ONNX graph, "
                                          "fastllm.json manifest and tokenizer, verified against PyTorch.")
    p.add_argument("src", help="local Hugging Face model directory (config.json, safetensors, tokenizer files)")
    p.add_argument("out", help="directory to write; created only once the export is verified")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap the context (default: the model's max_position_embeddings)")
    p.add_argument("--graph", choices=("fused", "portable"), default=None,
                   help="fused: ONNX Runtime contrib ops, KV cache written in place (default where it applies); "
                        "portable: plain ONNX ops")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="; ".join(f"{name}: {p.purpose}" for name, p in PRECISIONS.items())
                   + f". {' and '.join(QUANTIZED)} are quantized from the fp32 graph, with a quality report and gate "
                     "(as `fastllm quantize`)")
    add_quant_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a fastllm model directory holding only model files")
    p.add_argument("--threads", type=int, default=None, help="threads for verification (default: all cores)")
    p.set_defaults(func=run)


def add_quant_options(p) -> None:
    """Every option defaults to None, so that an option given with a precision it does not apply to is refused."""
    quantized = [PRECISIONS[name] for name in QUANTIZED]
    q = p.add_argument_group(f"quantization ({' / '.join(QUANTIZED)})")
    q.add_argument("--method", choices=METHODS, default=None,
                   help="weight-only: block-wise MatMulNBits; dynamic: int8 MatMulInteger with activations quantized "
                        "per call. Available: " + "; ".join(f"{p.name} {', '.join(p.methods)}" for p in quantized)
                        + " (the first is the default)")
    q.add_argument("--block-size", type=int, default=None,
                   help="weights per scale (default: " + ", ".join(f"{p.name} {p.block_size}" for p in quantized) + ")")
    q.add_argument("--asymmetric", action="store_true", default=None, help="zero points per block (default: symmetric)")
    q.add_argument("--rtn", action="store_true", default=None,
                   help="weight-only: ONNX Runtime's round-to-nearest scales (default: each block's scale fitted by "
                        "weighted least squares)")
    q.add_argument("--no-activation-aware", action="store_true", default=None,
                   help="weight-only: no calibration (default: AWQ-style per-feature scales folded into the norms "
                        "and up projections, and the fit weighed by calibration activations)")
    q.add_argument("--accuracy-level", type=int, default=None,
                   help="MatMulNBits compute type: 4 = int8 (default; fast on VNNI/AMX), 0 = fp32")
    q.add_argument("--keep-lm-head", action="store_true", default=None, help="leave the LM head in fp32")
    q.add_argument("--keep-embedding", action="store_true", default=None,
                   help="leave the embedding lookup in fp32 (default: block-quantized, sharing the LM head's "
                        "quantized weight when they are tied)")
    q.add_argument("--mixed", choices=KEEP, default=None,
                   help="mixed precision: measure each MatMul's sensitivity and keep the most sensitive ones in "
                        f"{' or '.join(KEEP)} until perplexity on calibration text is within --max-ppl-increase")
    q.add_argument("--prefill", choices=tuple(PREFILL), default=None,
                   help="also write a prompt graph in this precision (prefill.onnx), sharing the KV cache: prompt "
                        "chunks run its kernels, which are faster than weight-only int4/int8 at many rows (TTFT), "
                        "decode steps the smaller weights. Costs its size on disk and in memory; fused graph only")
    q.add_argument("--calibration-text", default=None,
                   help="text for calibration and --mixed (default: the training split of the project's corpus)")
    q.add_argument("--max-ppl-increase", type=float, default=None,
                   help="quality gate: relative perplexity increase allowed (default on text: "
                        + ", ".join(f"{p.name} {p.max_ppl_increase}" for p in quantized)
                        + "; on sequences the fp32 model samples itself, when there is no tokenizer or too little "
                          "text: " + ", ".join(f"{p.name} {p.max_ppl_increase_self_generated}" for p in quantized)
                        + ")")
    q.add_argument("--max-kl", type=float, default=None,
                   help="quality gate: mean KL divergence of next-token distributions allowed (default: "
                        + ", ".join(f"{p.name} {p.max_kl}" for p in quantized) + ")")
    q.add_argument("--min-agreeing-prefix", type=float, default=None,
                   help="quality gate: mean count of greedy tokens identical to fp32's before the first difference "
                        "(default: " + ", ".join(f"{p.name} {p.min_agreeing_prefix}" for p in quantized) + ")")
    q.add_argument("--text", default=None, help="text for the perplexity check (default: the held-out split of the "
                                                "project's Python documentation corpus)")
    q.add_argument("--force", action="store_true", default=None, help="write the model even if it fails the quality gate")


QUANT_FLAGS = {"method": "--method", "block_size": "--block-size", "asymmetric": "--asymmetric", "rtn": "--rtn",
               "no_activation_aware": "--no-activation-aware",
               "accuracy_level": "--accuracy-level", "keep_lm_head": "--keep-lm-head",
               "keep_embedding": "--keep-embedding", "mixed": "--mixed", "prefill": "--prefill", "calibration_text": "--calibration-text",
               "max_ppl_increase": "--max-ppl-increase", "max_kl": "--max-kl",
               "min_agreeing_prefix": "--min-agreeing-prefix", "text": "--text", "force": "--force"}


def quant_options(args) -> QuantOptions | None:
    """The quantization options for --precision, checked before any work; None for a precision that is not
    quantized, which refuses every quantization option."""
    if not PRECISIONS[args.precision].quantized:
        given = [flag for dest, flag in QUANT_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: quantization options, for --precision {' or '.join(QUANTIZED)} "
                             f"only, not {args.precision}; drop them or choose a quantized precision")
        return None
    given = {"method": args.method, "block_size": args.block_size, "accuracy_level": args.accuracy_level,
             "symmetric": False if args.asymmetric else None, "lm_head": False if args.keep_lm_head else None,
             "fit_scales": False if args.rtn else None,
             "activation_aware": False if args.no_activation_aware else None,
             "embedding": False if args.keep_embedding else None, "mixed": args.mixed, "prefill": args.prefill,
             "max_ppl_increase": args.max_ppl_increase, "max_kl": args.max_kl,
             "min_agreeing_prefix": args.min_agreeing_prefix}
    return QuantOptions(args.precision, **{field: value for field, value in given.items() if value is not None})


def read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FastLLMError(f"cannot read {path}: {e}") from None


def _progress(line: str) -> None:
    print(f"[export] {line}", file=sys.stderr)


def run(args) -> int:
    try:
        from fastllm.export.pipeline import export_model
    except ImportError as e:
        raise FastLLMError(f"`fastllm export` needs the export extra ({e.name} is missing): "
                           "pip install torch==2.13.0 'fastllm[export]'") from None
    quant = quant_options(args)
    manifest = export_model(args.src, args.out, graph=args.graph, precision=args.precision, quant=quant,
                            text=read_text(args.text), calibration=read_text(args.calibration_text),
                            force=bool(args.force), max_context=args.max_context, overwrite=args.overwrite,
                            threads=args.threads, progress=_progress)
    if quant:
        print(f"{args.out}: {manifest.architecture}, {manifest.graph.kind} graph, {manifest.precision}; "
              + describe_quality(manifest))
        return 0
    v = manifest.verification
    print(f"{args.out}: {manifest.architecture}, {manifest.num_layers} layers, {manifest.graph.kind} graph, "
          f"{manifest.precision}; verified: max |Δlogits| {v['max_abs_diff']:.2e} <= {v['tolerance']:.2e}, "
          f"greedy {v['new_tokens']} tokens identical")
    return 0


def describe_quality(manifest) -> str:
    from fastllm.export.quality import describe_report

    return describe_report(manifest.quantization["quality"])


def register_quantize(subparsers) -> None:
    p = subparsers.add_parser("quantize", help=f"quantize an exported fp32 model to {' / '.join(QUANTIZED)}, with a "
                                               "quality gate",
                              description="Quantization (weight-only, or dynamic int8; optionally mixed "
                                          "precision) of the fp32 model directory SRC into OUT. Measures "
                                          "perplexity, greedy agreement, |Δlogits| and KL against SRC, stores the "
                                          "report in the manifest, and refuses (writing nothing) when "
                                          "perplexity rises more than the budget, unless --force.")
    p.add_argument("src", help="fastllm model directory, fp32")
    p.add_argument("out")
    p.add_argument("--precision", choices=QUANTIZED, required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a fastllm model directory holding only model files")
    add_quant_options(p)
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from fastllm.export.quantize import quantize_model

    manifest = quantize_model(args.src, args.out, quant_options(args), text=read_text(args.text),
                              calibration=read_text(args.calibration_text), force=bool(args.force),
                              overwrite=args.overwrite, progress=_progress)
    print(f"{args.out}: {manifest.architecture}, {manifest.graph.kind} graph, {manifest.precision}; "
          + describe_quality(manifest))
    return 0

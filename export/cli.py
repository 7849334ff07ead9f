"""`fastllm export SRC OUT`: registered through the `fastllm.commands` entry point (the runtime never imports it)."""

from __future__ import annotations

import sys


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
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp32 (default; CPU) or fp16 (for CUDA: weights, activations and KV cache in float16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--threads", type=int, default=None, help="threads for verification (default: all cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from export.pipeline import export_model
    except ImportError as e:
        from fastllm.errors import FastLLMError

        raise FastLLMError(f"`fastllm export` needs the export extra ({e.name} is missing): "
                           "pip install torch==2.13.0 'fastllm[export]'") from None
    manifest = export_model(args.src, args.out, graph=args.graph, precision=args.precision, max_context=args.max_context, overwrite=args.overwrite,
                            threads=args.threads, progress=lambda line: print(f"[export] {line}", file=sys.stderr))
    v = manifest.verification
    print(f"{args.out}: {manifest.architecture}, {manifest.num_layers} layers, {manifest.graph.kind} graph, {manifest.precision}; verified: max |Δlogits| "
          f"{v['max_abs_diff']:.2e} <= {v['tolerance']:.2e}, greedy {v['new_tokens']} tokens identical")
    return 0

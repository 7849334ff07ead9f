"""`fastllm eval-ppl MODEL [--text FILE]`: perplexity of a fastllm model directory (runtime, no torch) or of a
Hugging Face directory (PyTorch), on the same windows. Registered through the `fastllm.commands` entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-ppl", help="perplexity of a model directory on a text",
                              description="Perplexity over non-overlapping windows. MODEL is a fastllm model "
                                          "directory (evaluated by the runtime) or a Hugging Face directory "
                                          "(evaluated by PyTorch). Default text: the held-out split of the "
                                          "project's Python documentation corpus.")
    p.add_argument("model")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the held-out documentation split)")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastllm.errors import ModelLoadError

    model = Path(args.model)
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"cannot read --text {args.text}: {e}") from None
    else:
        from fastllm.export.corpus import held_out_text

        text = held_out_text()
    if (model / "fastllm.json").is_file():
        import fastllm
        from fastllm.perplexity import perplexity

        result, kind = perplexity(fastllm.load(model, threads=args.threads), text, window=args.window), "fastllm"
    elif (model / "config.json").is_file():
        from fastllm.train.evaluate import hf_perplexity

        result, kind = hf_perplexity(model, text, window=args.window), "pytorch"
    else:
        raise ModelLoadError(f"{args.model} holds neither fastllm.json nor config.json; pass a fastllm model "
                             "directory or a Hugging Face model directory")
    if args.json:
        print(json.dumps({"model": str(model), "evaluator": kind, **result.to_dict()}))
    else:
        print(f"{model}: perplexity {result.ppl:.4f} (mean NLL {result.mean_nll:.5f}) over {result.tokens} tokens, "
              f"windows of {result.window}, {kind}", file=sys.stdout)
    return 0

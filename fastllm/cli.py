"""The `fastllm` command: generate, info, and subcommands registered by other packages (export)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from fastllm.errors import FastLLMError


def add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt (streams by default)",
                              usage="fastllm generate [MODEL_DIR] PROMPT [options]")
    p.add_argument("model_and_prompt", nargs="+", metavar="[MODEL_DIR] PROMPT",
                   help="model directory written by `fastllm export` (default: the bundled model), then the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end, with timings")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_generate)


def default_model() -> str:
    """The model the `fastllm.models` entry point group names as default (the project's bundled model)."""
    for ep in entry_points(group="fastllm.models"):
        if ep.name == "default":
            try:
                return str(ep.load()())
            except ImportError as e:
                raise FastLLMError(f"the bundled model needs the export extra to be exported on first use "
                                   f"({e.name} is missing): pip install torch==2.13.0 'fastllm[export]', or pass "
                                   "a model directory") from None
    raise FastLLMError("no model directory given and no bundled model is installed; pass MODEL_DIR")


def run_generate(args) -> int:
    import fastllm

    if len(args.model_and_prompt) > 2:
        raise FastLLMError(f"generate takes [MODEL_DIR] PROMPT, got {len(args.model_and_prompt)} arguments; quote "
                           "the prompt")
    *model, prompt = args.model_and_prompt
    params = fastllm.SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))
    args.prompt, args.model = prompt, model[0] if model else default_model()
    engine = fastllm.load(args.model, device=args.device, threads=args.threads)
    if args.no_stream:
        c = engine.generate(args.prompt, params)
        print(c.text)
        print(f"[{c.prompt_tokens} prompt + {c.completion_tokens} new tokens, finish: {c.finish_reason}, "
              f"TTFT {c.ttft_s * 1e3:.1f} ms, TPOT {c.tpot_s * 1e3:.2f} ms, {c.tokens_per_s:.1f} tok/s]",
              file=sys.stderr)
        return 0
    stream = engine.stream(args.prompt, params)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        stream.close()
    sys.stdout.write("\n")
    return 0


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="summarise a model directory's manifest")
    p.add_argument("model")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    from fastllm.manifest import Manifest

    m = Manifest.read(args.model)
    files = sorted(Path(args.model).iterdir())
    size = sum(f.stat().st_size for f in files if f.is_file())
    lines = [
        f"model:        {args.model}",
        f"architecture: {m.architecture} (manifest format {m.format_version})",
        f"shape:        {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} kv heads,"
        f" head dim {m.head_dim}, vocab {m.vocab_size}",
        f"context:      {m.max_context} tokens" + (f", rope {m.rope}" if m.rope else ", learned positions"),
        f"precision:    {m.precision}",
        *quantization_lines(m.quantization or {}),
        f"graph:        {m.graph.kind}, {m.graph.file}, KV {m.graph.kv_layout}",
        f"tokens:       eos {list(m.eos_token_ids)}, bos {m.bos_token_id}, pad {m.pad_token_id}",
        f"tokenizer:    {m.tokenizer or 'none (token ids only)'}",
        f"size on disk: {size / 1e6:.2f} MB in {len(files)} files",
    ]
    v = m.verification
    if v:
        lines.append(f"verified:     {'(its fp32 source) ' if m.quantization else ''}"
                     f"max |Δlogits| {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:.2e}) vs "
                     f"{v['reference']}, greedy {v['new_tokens']} tokens "
                     f"{'identical' if v['greedy_match'] else 'DIFFER'}")
    print("\n".join(lines))
    return 0


def quantization_lines(q: dict) -> list[str]:
    """What `fastllm quantize` recorded, in a few lines (the manifest holds the full report)."""
    if not q:
        return []
    options = q.get("options", {})
    detail = (f"blocks of {options['block_size']}, {'symmetric' if options.get('symmetric') else 'asymmetric'}"
              if q.get("method") == "weight-only" and "block_size" in options else "")
    lines = [f"quantized:    {q.get('method')}{', ' + detail if detail else ''} ({q.get('algorithm', '')})"]
    if "matmuls" in q:
        lines.append("matmuls:      " + ", ".join(f"{n} {p}" for p, n in q["matmuls"].items())
                     + f"; LM head {q.get('lm_head')}")
    mixed = q.get("mixed_precision")
    if mixed:
        lines.append(f"mixed:        kept {mixed['kept_count']} of {mixed['candidates']} in {mixed['keep']} by "
                     f"measured sensitivity: {', '.join(mixed['kept'])}")
    embedding = q.get("embedding")
    if embedding is not None:
        lines.append("embedding:    " + (f"int{embedding['bits']}, blocks of {embedding['block_size']}"
                                         + (", shared with the LM head" if embedding.get("shared_with_lm_head")
                                            else "") if embedding.get("quantized") else "fp32"))
    quality = q.get("quality", {})
    if quality:
        parts = []
        if "perplexity" in quality:
            p = quality["perplexity"]
            parts.append(f"perplexity {p['fp32']:.3f} -> {p['quantized']:.3f} ({p['relative_increase']:+.2%})")
        g = quality.get("greedy")
        if g:
            parts.append(f"greedy {g['identical']}/{g['prompts']} identical, mean agreeing prefix "
                         f"{g['mean_agreeing_prefix']:.1f} of {g['new_tokens']}")
        if "logits" in quality:
            parts.append(f"mean KL {quality['logits']['mean_kl']:.2e}")
        gate = quality.get("gate", {})
        if gate:
            parts.append(f"gate {'passed' if gate.get('passed') else 'FAILED'} "
                         f"(budget {gate['max_ppl_increase']:.2%}{', forced' if gate.get('forced') else ''})")
        lines.append("quality:      " + "; ".join(parts))
    return lines


def add_plugins(subparsers) -> None:
    """Subcommands other packages register under the `fastllm.commands` entry point group (e.g. export)."""
    for ep in entry_points(group="fastllm.commands"):
        try:
            ep.load()(subparsers)
        except ImportError as e:
            p = subparsers.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda _a, e=e, name=ep.name: _unavailable(name, e))


def _unavailable(name: str, error: ImportError) -> int:
    raise FastLLMError(f"`fastllm {name}` is not installed ({error}); install it with pip install 'fastllm[export]'")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastllm", description="Fast inference for decoder LMs exported to ONNX.")
    sub = p.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_info(sub)
    add_plugins(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except FastLLMError as e:
        print(f"fastllm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

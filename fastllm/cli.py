"""The `fastllm` command: generate, info, and subcommands registered by other packages (export)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from fastllm.errors import ContextLengthError, FastLLMError, InvalidPromptError


def add_generate(subparsers) -> None:
    from fastllm.sampler import SamplingParams

    d = SamplingParams()
    config = "default: the model's generation config, else"
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt (streams by default)",
        usage="fastllm generate [MODEL_DIR] (PROMPT | - | --ids IDS | --prompt-file FILE) [options]",
        description="Generate from one prompt: PROMPT, - (read stdin), --ids or --prompt-file, exactly one. Sampling "
                    "flags left out take the model's generation config (fastllm.json `generation`), else "
                    "SamplingParams' defaults; each flag given overrides that field only.")
    p.add_argument("model_and_prompt", nargs="*", metavar="[MODEL_DIR] PROMPT",
                   help="model directory written by `fastllm export` (default: the bundled model), then the prompt "
                        "(- reads it from stdin as UTF-8)")
    p.add_argument("--ids", type=token_ids, default=None, metavar="1,2,3",
                   help="the prompt as comma-separated token ids (for models without a tokenizer, whose output is "
                        "then printed as ids too)")
    p.add_argument("--prompt-file", type=Path, default=None, metavar="FILE",
                   help="read the prompt from FILE as UTF-8 (one final newline is dropped, for - too)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens to generate (default: {d.max_new_tokens}); clamped, with a note on stderr, to "
                        "what fits in the model's context after the prompt")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"0 = greedy ({config} {d.temperature:g}, greedy)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help=f"0 = off ({config} {d.top_k})")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help=f"1 = off ({config} {d.top_p:g})")
    p.add_argument("--min-p", type=float, default=None, metavar="M", help=f"0 = off (default: {d.min_p:g})")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help=f"1 = off, over prompt and output tokens ({config} {d.repetition_penalty:g})")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help=f"in [-2, 2], OpenAI's rule over output tokens (default: {d.presence_penalty:g})")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help=f"in [-2, 2], OpenAI's rule over output tokens (default: {d.frequency_penalty:g})")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none, not reproducible)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop string, cut from the text (repeatable; default: none)")
    p.add_argument("--stop-token-id", action="append", type=int, default=None, metavar="ID",
                   help="token id that ends generation besides the model's EOS ids (repeatable; default: none)")
    p.add_argument("--ignore-eos", action="store_const", const=True, default=None,
                   help="keep generating past the model's EOS ids (default: stop at EOS)")
    p.add_argument("--no-stream", action="store_true",
                   help="print the whole completion at the end, with timings on stderr (default: stream)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding with prompt-lookup drafts: the same tokens, several per step where "
                        "the text repeats the prompt or itself (fused graph; default: off)")
    p.set_defaults(func=run_generate)


BUNDLED_MODEL = Path(__file__).resolve().parent / "data" / "pydoc-llama"  # shipped in the package


def default_model() -> str:
    """The model `fastllm generate "prompt"` uses when no directory is given: the project's own, shipped exported
    inside the package (see fastllm/train/bundled.py), so it needs nothing beyond the runtime dependencies."""
    if not (BUNDLED_MODEL / "fastllm.json").is_file():
        raise FastLLMError(f"no model directory given and the bundled model is missing from {BUNDLED_MODEL} "
                           "(a broken install: reinstall fastllm); pass MODEL_DIR")
    return str(BUNDLED_MODEL)


def token_ids(text: str) -> list[int]:
    """--ids: comma-separated integers."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "ignore_eos")


def run_generate(args) -> int:
    import fastllm

    model, prompt = prompt_source(args)  # usage errors and bad flags are reported before a model is loaded
    overrides = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.stop is not None:
        overrides["stop"] = tuple(args.stop)
    if args.stop_token_id is not None:
        overrides["stop_token_ids"] = tuple(args.stop_token_id)
    fastllm.SamplingParams.from_mapping(overrides)
    model = model or default_model()
    engine = fastllm.load(model, device=args.device, threads=args.threads, speculative=args.speculative)
    if isinstance(prompt, str) and engine.tokenizer is None:
        raise InvalidPromptError(f"{model} has no tokenizer; pass the prompt as token ids with --ids 1,2,3")
    (ids,), _ = engine.prompt_ids(prompt)
    params = fit_context(engine.default_params(**overrides), len(ids), engine.manifest.max_context)
    as_text = engine.tokenizer is not None  # without a tokenizer the output is token ids, comma-separated like --ids
    if args.no_stream:
        c = engine.generate(ids, params)
        print(c.text if as_text else ",".join(map(str, c.token_ids)))
        print(f"[{c.prompt_tokens} prompt + {c.completion_tokens} new tokens, finish: {c.finish_reason}, "
              f"TTFT {c.ttft_s * 1e3:.1f} ms, TPOT {c.tpot_s * 1e3:.2f} ms, {c.tokens_per_s:.1f} tok/s]",
              file=sys.stderr)
        return 0
    stream = engine.stream(ids, params) if as_text else id_pieces(engine, ids, params)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        stream.close()
    sys.stdout.write("\n")
    return 0


def prompt_source(args) -> tuple[str | None, str | list[int]]:
    """(MODEL_DIR or None, the prompt) from exactly one of: PROMPT, - (stdin), --ids, --prompt-file."""
    positional = list(args.model_and_prompt)
    flags = [flag for flag, value in (("--ids", args.ids), ("--prompt-file", args.prompt_file)) if value is not None]
    if flags:
        if len(flags) > 1 or len(positional) > 1:
            given = (["PROMPT"] if len(positional) > 1 else []) + flags
            raise UsageError(f"give exactly one prompt source (PROMPT, -, --ids or --prompt-file), got "
                             f"{' and '.join(given)}")
        model = positional[0] if positional else None
        if args.ids is not None:
            return model, args.ids
        try:
            data = args.prompt_file.read_bytes()
        except OSError as e:
            raise InvalidPromptError(f"cannot read --prompt-file {str(args.prompt_file)!r}: {e.strerror or e}; pass a "
                                     "readable UTF-8 text file") from None
        return model, utf8_text(data, f"--prompt-file {str(args.prompt_file)!r}")
    if not positional or len(positional) == 1 and (Path(positional[0]) / "fastllm.json").is_file():
        raise UsageError("no prompt: give PROMPT, - (read stdin), --ids 1,2,3 or --prompt-file FILE")
    if len(positional) > 2:
        raise UsageError(f"generate takes [MODEL_DIR] PROMPT, got {len(positional)} arguments; quote the prompt")
    *model, prompt = positional
    if prompt == "-":
        prompt = utf8_text(sys.stdin.buffer.read(), "stdin")
    return (model[0] if model else None), prompt


def utf8_text(data: bytes, where: str) -> str:
    """A prompt read from a file or stdin: strict UTF-8, one final newline dropped (as the shell's $(cat FILE))."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidPromptError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                 "convert it to UTF-8, e.g. with iconv") from None
    return text.removesuffix("\n")


def fit_context(params, prompt_tokens: int, context: int):
    """Clamp max_new_tokens to what fits in the context after the prompt, saying so on stderr."""
    room = context - prompt_tokens
    if room < 1:
        raise ContextLengthError(f"the prompt has {prompt_tokens} tokens but the model's context is {context} tokens, "
                                 f"leaving no room to generate; shorten it to at most {context - 1} tokens")
    if params.max_new_tokens > room:
        print(f"[fastllm] max-new-tokens {params.max_new_tokens} -> {room}: the context is {context} tokens and the "
              f"prompt has {prompt_tokens}", file=sys.stderr)
        params = params.replace(max_new_tokens=room)
    return params


def id_pieces(engine, ids: list[int], params):
    """The generated ids as text for stdout when the model has no tokenizer: 5,17,3 (the format --ids reads)."""
    steps = engine.tokens(ids, params)
    try:
        for n, (token,) in enumerate(steps):
            yield f"{',' if n else ''}{token}"
    finally:
        steps.close()


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
        (f"shape:        {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} kv "
         f"heads, head dim {m.head_dim}, vocab {m.vocab_size}"),
        f"context:      {m.max_context} tokens" + (f", rope {m.rope}" if m.rope else ", learned positions"),
        f"precision:    {m.precision}",
        *quantization_lines(m.quantization or {}),
        f"graph:        {m.graph.kind}, {m.graph.file}, KV {m.graph.kv_layout}",
        *([f"prompt graph: {m.graph.prefill.get('precision')} {m.graph.prefill.get('method') or ''}".rstrip()
           + f", {m.graph.prefill.get('file')} (prompt chunks; decode steps run {m.graph.file})"]
          if m.graph.prefill else []),
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
            on = "" if "tokens" not in p else f" on {p['tokens']} " + (
                "self-generated tokens" if p.get("source") == "self-generated" else "tokens of text")
            parts.append(f"perplexity {p['fp32']:.3f} -> {p['quantized']:.3f} ({p['relative_increase']:+.2%}){on}")
        g = quality.get("greedy")
        if g:
            parts.append(f"greedy {g['identical']}/{g['prompts']} identical, mean agreeing prefix "
                         f"{g['mean_agreeing_prefix']:.1f} of {g['new_tokens']}")
        if "logits" in quality:
            parts.append(f"mean KL {quality['logits']['mean_kl']:.2e}")
        gate = quality.get("gate", {})
        if gate:
            limits, failed = gate.get("limits"), gate.get("failed", [])
            if limits:  # each limit, the failed ones marked
                shown = {"max_ppl_increase": f"perplexity <= {limits['max_ppl_increase']:+.2%}",
                         "max_kl": f"mean KL <= {limits['max_kl']:.3g}",
                         "min_agreeing_prefix": f"agreeing prefix >= {limits['min_agreeing_prefix']:.1f}"}
                detail = ", ".join(text + (" FAILED" if name in failed else "") for name, text in shown.items())
            else:  # written before KL and greedy agreement were gated: a perplexity budget only
                detail = f"budget {gate['max_ppl_increase']:.2%}" + ("" if "perplexity" in quality else
                                                                     ", perplexity not measured")
            parts.append(f"gate {'passed' if gate.get('passed') else 'FAILED'} "
                         f"({detail}{', forced' if gate.get('forced') else ''})")
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


class UsageError(FastLLMError):
    """The command line itself is wrong: exit status 2, like argparse's own usage errors."""


class Parser(argparse.ArgumentParser):
    """argparse with fastllm's one-line errors (`fastllm: error: ...`) and exit status 2 for usage errors."""

    def error(self, message: str):
        self.exit(2, f"fastllm: error: {message}; see `{self.prog} --help`\n")


class Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print fastllm's and onnxruntime's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import onnxruntime

        import fastllm

        print(f"fastllm {fastllm.__version__} (onnxruntime {onnxruntime.__version__})")
        parser.exit(0)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastllm", description="Fast inference for decoder LMs exported to ONNX.")
    p.add_argument("--version", action=Version)
    sub = p.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_info(sub)
    add_plugins(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error (one line on stderr), 2 a usage error (one line), 130 interrupted."""
    try:
        args, unknown = parser().parse_known_args(argv)
    except SystemExit as e:  # --help and --version exit 0, usage errors 2
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        if unknown:  # reported here to point at the subcommand's help
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        return args.func(args)
    except UsageError as e:
        return error(f"{e}; see `fastllm {args.command} --help`", 2)
    except FastLLMError as e:
        return error(str(e), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`fastllm generate ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


def error(message: str, status: int) -> int:
    print("fastllm: error: " + " ".join(message.split("\n")), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

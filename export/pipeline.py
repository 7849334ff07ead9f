"""The export pipeline as named stages: load -> adapt -> trace -> optimize -> describe -> verify -> quantize -> commit.

A graph is traced in fp32 (or fp16) and verified against PyTorch; a quantized precision (int8, int4) then runs the
quantize stage (export/quantize.py) on that verified fp32 graph, which stays in the staging directory only as the
reference of the quality report and gate. Everything is written into one staging directory beside OUT, moved into
place only once every stage has passed; on any failure it is removed and OUT is left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import onnx
import torch

import fastllm
from fastllm.errors import ExportError, ModelLoadError
from fastllm.export import trace as trace_stage
from fastllm.export.decoder import DecoderLM
from fastllm.export.fp16 import to_fp16
from fastllm.export.fused import fused_supported
from fastllm.export.optimize import optimize
from fastllm.export.precision import PRECISIONS, QUANTIZED, QuantOptions
from fastllm.export.quantize import Progress, quantize, quiet
from fastllm.export.registry import Adapted, adapter_for
from fastllm.export.staging import check_destination, staging
from fastllm.export.verify import VerifyReport, verify
from fastllm.manifest import GRAPH_KINDS, GraphInfo, Manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# -- stage 1: load ------------------------------------------------------------------------------------------------
def load_source(src: Path):
    """A local Hugging Face model directory -> the transformers model in float32, eager attention."""
    if not src.is_dir():
        raise ModelLoadError(f"source {str(src)!r} is not a directory; pass a local Hugging Face model directory "
                             "(config.json, *.safetensors, tokenizer files)")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{str(src)!r} has no config.json; pass a Hugging Face model directory")
    try:
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path} is not valid JSON ({e})") from None
    if not architectures:
        raise ModelLoadError(f"{config_path} names no architectures; it must list one, e.g. LlamaForCausalLM")
    adapter_for(architectures[0])  # refuse an unsupported architecture before loading any weights

    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise ModelLoadError(f"transformers could not load {src}: {first}") from None


# -- stage 2: adapt -----------------------------------------------------------------------------------------------
def adapt(hf_model, max_context: int | None) -> tuple[DecoderLM, Adapted]:
    config = hf_model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_context is not None and (max_context < 2 or (limit and max_context > limit)):
        raise ExportError(f"max_context must be in [2, {limit}] for this model, got {max_context}")
    max_context = max_context or limit
    adapted = adapter_for(type(hf_model).__name__)(hf_model, max_context)
    module = DecoderLM(adapted.spec, adapted.cos_table, adapted.sin_table)
    missing, unexpected = module.load_state_dict(adapted.state_dict, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and adapted.spec.tie_embeddings)]
    if missing or unexpected:
        raise ExportError(f"adapting {adapted.spec.architecture}: missing weights {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return module.eval(), adapted


# -- stage 4: describe (manifest, tokenizer) ----------------------------------------------------------------------
def token_ids(hf_model) -> tuple[tuple[int, ...], int | None, int | None]:
    config, gen = hf_model.config, getattr(hf_model, "generation_config", None)
    eos: list[int] = []
    for source in (gen, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for t in [value] if isinstance(value, int) else (value or []):
            if t not in eos and 0 <= t < config.vocab_size:
                eos.append(t)

    def first(name):
        for source in (gen, config):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and 0 <= value < config.vocab_size:
                return value
        return None

    pad = first("pad_token_id")
    return tuple(eos), first("bos_token_id"), pad if pad is not None else (eos[0] if eos else None)


def write_tokenizer(tokenizer, directory: Path) -> str | None:
    """Copy or save the tokenizer as tokenizer.json (plus its config files). Returns the file name or None."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if src.is_file():
            shutil.copy(src, directory / "tokenizer.json")
            return "tokenizer.json"
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copy(src / name, directory / name)
        if "tokenizer.json" in copied:
            return "tokenizer.json"
        try:  # e.g. only a sentencepiece tokenizer.model: let transformers convert it
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception:
            return None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise ExportError(f"cannot save tokenizer of type {type(tokenizer).__name__}; pass a tokenizers.Tokenizer, "
                          "a fast transformers tokenizer or a directory holding tokenizer.json")
    backend.save(str(directory / "tokenizer.json"))
    return "tokenizer.json"


def versions() -> dict:
    out = {"fastllm": fastllm.__version__}
    for name in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def choose_graph(spec, graph: str | None) -> str:
    """The fused graph wherever it applies (the default), else the portable one; an explicit choice is checked."""
    reason = fused_supported(spec)
    if graph is None:
        return "portable" if reason else "fused"
    if graph not in GRAPH_KINDS:
        raise ExportError(f"graph must be one of {', '.join(GRAPH_KINDS)}, got {graph!r}")
    if graph == "fused" and reason:
        raise ExportError(f"the fused graph does not apply to this model: {reason}; export with --graph portable")
    return graph


def describe(hf_model, adapted: Adapted, graph, kind: str, precision: str, optimized: dict | None,
             tokenizer_file: str | None, source: str) -> Manifest:
    spec = adapted.spec
    eos, bos, pad = token_ids(hf_model)
    gen = getattr(hf_model, "generation_config", None)
    generation = {k: getattr(gen, k) for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
                  if gen is not None and getattr(gen, k, None) is not None}
    rope = None
    if spec.positions == "rope":
        from fastllm.export.architectures.rope import rope_parameters

        rope = {"rotary_dim": spec.rotary_dim, **rope_parameters(hf_model.config)}
    return Manifest(
        architecture=spec.architecture, num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size, max_context=spec.max_context, precision=precision,
        graph=GraphInfo(kind=kind, file=trace_stage.GRAPH_FILE,
                        inputs=trace_stage.tensor_infos(graph.graph.input),
                        outputs=trace_stage.tensor_infos(graph.graph.output), optimized=optimized),
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, rope=rope, tokenizer=tokenizer_file,
        generation=generation, source={"path": source, "versions": versions()},
    )


# -- the pipeline -------------------------------------------------------------------------------------------------
def quantization_for(precision: str, quant: QuantOptions | None) -> QuantOptions | None:
    """The quantize stage's options for `precision`, or None when the graph is traced in that precision."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if quant is not None and quant.precision != precision:
        raise ExportError(f"the quantization options are for {quant.precision}, but precision is {precision!r}; "
                          f"pass precision={quant.precision!r}")
    if not PRECISIONS[precision].quantized:
        return None
    return quant or QuantOptions(precision)


def export_traced(model, directory: Path, *, tokenizer, graph: str | None, precision: str, max_context: int | None,
                  threads: int | None, progress: Progress, source: str) -> Manifest:
    """Stages adapt -> trace -> optimize (or fp16) -> describe -> verify, writing the model into DIRECTORY."""
    progress(f"adapt: {type(model).__name__}")
    module, adapted = adapt(model, max_context)
    kind = choose_graph(adapted.spec, graph)
    spec = adapted.spec
    progress(f"trace: {kind} graph, {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}, "
             f"context {spec.max_context} -> ONNX opset {trace_stage.OPSET}")
    trace_stage.trace(module, directory, kind)
    del module
    optimized = None
    if precision == "fp16":  # for CUDA; its graph passes run at load on the GPU
        progress("precision: float16 weights, activations and KV cache (logits stay float32)")
        to_fp16(directory)
    elif kind == "fused":  # the portable graph stays plain ONNX: ORT's fusions would add contrib ops
        progress("optimize: onnxruntime graph passes for cpu, saved with the model")
        optimized = optimize(directory, target="cpu")
    progress("describe: manifest and tokenizer")
    graph_proto = onnx.load(str(directory / trace_stage.GRAPH_FILE), load_external_data=False)
    manifest = describe(model, adapted, graph_proto, kind, precision, optimized,
                        write_tokenizer(tokenizer, directory), source)
    manifest.write(directory)
    progress("verify: logits and greedy tokens against PyTorch")
    report: VerifyReport = verify(model, directory, threads=threads, rtol=PRECISIONS[precision].tolerance)
    progress(f"verify: max |Δlogits| {report.max_abs_diff:.2e} (tolerance {report.tolerance:.2e}), "
             f"greedy {report.new_tokens} tokens identical")
    manifest = dataclasses.replace(manifest, verification=report.to_dict())
    manifest.write(directory)
    return manifest


def export_pretrained(model, out, *, tokenizer=None, graph: str | None = None, precision: str = "fp32",
                      quant: QuantOptions | None = None, text: str | None = None, calibration: str | None = None,
                      force: bool = False, max_context: int | None = None, overwrite: bool = False,
                      threads: int | None = None, progress: Progress = quiet, source: str = "in-memory") -> Manifest:
    """Export an in-memory transformers causal LM to the model directory OUT, verified against the model itself.

    A quantized precision is quantized from the verified fp32 graph with `quant` (default: the precision's
    defaults), its quality measured on `text` and gated, as `quantize_model` (export/quantize.py) does."""
    out = Path(out)
    quant = quantization_for(precision, quant)
    if quant is None and (text is not None or calibration is not None or force):
        raise ExportError(f"text, calibration and force are for a quantized precision "
                          f"({', '.join(QUANTIZED)}), not {precision}")
    check_destination(out, overwrite, sources=[Path(tokenizer)] if isinstance(tokenizer, (str, os.PathLike)) else [])
    t0 = time.perf_counter()
    with staging(out, "export") as tmp:
        traced = tmp / ".fp32" if quant else tmp  # the quantize stage's reference, removed before commit
        traced.mkdir(exist_ok=True)
        manifest = export_traced(model.float().eval(), traced, tokenizer=tokenizer, graph=graph,
                                 precision="fp32" if quant else precision, max_context=max_context, threads=threads,
                                 progress=progress, source=source)
        if quant:
            manifest = quantize(traced, tmp, quant, text=text, calibration=calibration, force=force,
                                progress=progress)
            shutil.rmtree(traced)
    progress(f"done in {time.perf_counter() - t0:.1f}s: {out}")
    return manifest


def export_model(src, out, *, graph: str | None = None, precision: str = "fp32", quant: QuantOptions | None = None,
                 text: str | None = None, calibration: str | None = None, force: bool = False,
                 max_context: int | None = None, overwrite: bool = False, threads: int | None = None,
                 progress: Progress = quiet) -> Manifest:
    """Export the Hugging Face model directory SRC to the fastllm model directory OUT (see export_pretrained)."""
    src, out = Path(src), Path(out)
    check_destination(out, overwrite, sources=(src,))
    quantization_for(precision, quant)  # refused before any weights are loaded
    progress(f"load: {src}")
    model = load_source(src)
    return export_pretrained(model, out, tokenizer=src, graph=graph, precision=precision, quant=quant, text=text,
                             calibration=calibration, force=force, max_context=max_context, overwrite=overwrite,
                             threads=threads, progress=progress, source=str(src.resolve()))

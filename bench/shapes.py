"""Models of named real shapes with random weights, for timing: with EOS ignored, latency does not depend on the
weight values, only on the shape. Each is written once as a Hugging Face directory (what eager PyTorch loads) and
exported from that directory to a fastllm model directory, both cached under the work directory:

    <work>/models/<shape>/hf/                        config.json, model.safetensors   (fp32)
    <work>/models/<shape>/fastllm-<graph>/           model.onnx, model.onnx.data, fastllm.json
    <work>/models/<shape>/fastllm-<graph>-<precision>/   quantized from the fp32 export (int8, int8-dynamic, int4)
    <work>/models/<shape>/shape.json                 what was built (re-used only while it matches the registry)

A cached export is re-used only while the exporter's code is unchanged (its fingerprint is stamped beside it).
Quantized models of random weights get a quality report on a short text, forced through the gate: it means
nothing for them, their timing is what counts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastllm.bench.errors import BenchError
from fastllm.export.precision import variants

Progress = Callable[[str], None]
SEED = 0  # weights are random but the same on every run
# --precisions -> (precision, method) of `fastllm quantize`: fp32, int8, int8-dynamic, int4
PRECISIONS = {"fp32": None, **variants()}
STAMP = ".exporter"  # in each built model directory: the exporter fingerprint it was built with


@dataclass(frozen=True)
class Shape:
    name: str
    architecture: str  # transformers class, e.g. "LlamaForCausalLM"
    config: dict = field(hash=False)  # keyword arguments of the architecture's config class
    max_context: int = 2048  # cap for the fastllm export (prompt + new tokens must fit)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def hf_config(self):
        import transformers as tf

        config_class = {"LlamaForCausalLM": tf.LlamaConfig, "Qwen2ForCausalLM": tf.Qwen2Config,
                        "GPT2LMHeadModel": tf.GPT2Config}[self.architecture]
        config = config_class(**self.config)
        config.architectures = [self.architecture]
        return config


SHAPES: dict[str, Shape] = {}


def register(shape: Shape) -> Shape:
    SHAPES[shape.name] = shape
    return shape


register(Shape("smollm2-135m", "LlamaForCausalLM", max_context=2304, config=dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None)))

register(Shape("qwen2.5-0.5b", "Qwen2ForCausalLM", max_context=2304, config=dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
    initializer_range=0.02, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)))

register(Shape("gpt2", "GPT2LMHeadModel", max_context=1024, config=dict(
    vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, initializer_range=0.02,
    bos_token_id=50256, eos_token_id=50256)))

register(Shape("tiny", "LlamaForCausalLM", max_context=256, config=dict(  # for the harness's own tests
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
    bos_token_id=0, eos_token_id=0, pad_token_id=1)))


def get(name: str) -> Shape:
    if name not in SHAPES:
        raise BenchError(f"unknown shape {name!r}; pass --shape with one of {sorted(SHAPES)}")
    return SHAPES[name]


def check(shapes: tuple[str, ...], precisions: tuple[str, ...]) -> None:
    """What both benchmarks' options ask of --shape and --precisions: at least one known shape, known precisions."""
    if not shapes:
        raise BenchError(f"no shape given; pass --shape with one of {sorted(SHAPES)}")
    for name in shapes:
        get(name)
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise BenchError(f"precisions must be a non-empty comma-separated list of {list(PRECISIONS)}, got "
                         f"{list(precisions)!r}")


@dataclass(frozen=True)
class BuiltShape:
    shape: Shape
    hf_dir: Path  # Hugging Face directory, fp32 safetensors
    fastllm_dirs: tuple[Path, ...]  # fastllm model directories built from hf_dir, per graph kind and precision
    parameters: int


def _record(shape: Shape) -> dict:
    return {"shape": asdict(shape), "seed": SEED}


def build(shape: Shape, work_dir: str | Path, *, graphs: tuple[str, ...] = ("fused",),
          precisions: tuple[str, ...] = ("fp32",), threads: int | None = None, progress: Progress = print
          ) -> BuiltShape:
    """Build (or re-use) the Hugging Face directory and its fastllm models, per graph kind and precision."""
    from fastllm.export import exporter_fingerprint

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise BenchError(f"precisions must be a non-empty comma-separated list of {list(PRECISIONS)}, got "
                         f"{list(precisions)!r}")
    root = Path(work_dir) / "models" / shape.name
    hf_dir, record_path = root / "hf", root / "shape.json"
    record = _record(shape)
    cached = json.loads(record_path.read_text()) if record_path.is_file() else None
    if cached is None or cached.get("built") != record or not (hf_dir / "config.json").is_file():
        if cached is None and root.is_dir() and any(root.iterdir()):
            raise BenchError(f"{root} exists and was not made by fastllm bench (it has no shape.json); choose another "
                             "--work-dir or move it away")
        shutil.rmtree(root, ignore_errors=True)  # made by bench: its shape.json is written before anything else
        root.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"building": record}) + "\n")
        progress(f"{shape.name}: building random {shape.architecture} weights -> {hf_dir}")
        parameters = _write_hf(shape, hf_dir)
        record_path.write_text(json.dumps({"built": record, "parameters": parameters}, indent=2) + "\n")
        cached = json.loads(record_path.read_text())
    if not (hf_dir / "tokenizer.json").is_file():
        _write_tokenizer(hf_dir)
    fingerprint = exporter_fingerprint()
    dirs = []
    for graph in graphs:
        fp32_dir = root / f"fastllm-{graph}"
        if not _usable_export(fp32_dir, fingerprint):
            from transformers.utils import logging as hf_logging

            from fastllm.export import export_model

            hf_logging.disable_progress_bar()
            (fp32_dir / STAMP).unlink(missing_ok=True)  # ours; --overwrite replaces only a directory of model files
            progress(f"{shape.name}: exporting the {graph} graph to {fp32_dir} (max context {shape.max_context}, "
                     "verified against PyTorch)")
            export_model(hf_dir, fp32_dir, graph=graph, max_context=shape.max_context, overwrite=True,
                         threads=threads, progress=lambda line: progress(f"{shape.name}: export: {line}"))
            (fp32_dir / STAMP).write_text(fingerprint)
        for precision in precisions:
            built = fp32_dir if precision == "fp32" else root / f"fastllm-{graph}-{precision}"
            if not _usable_export(built, fingerprint):
                (built / STAMP).unlink(missing_ok=True)
                _quantize(shape, fp32_dir, built, precision, progress)
                (built / STAMP).write_text(fingerprint)
            dirs.append(built)
    return BuiltShape(shape, hf_dir, tuple(dirs), int(cached["parameters"]))


def _quantize(shape: Shape, src: Path, out: Path, precision: str, progress: Progress) -> None:
    from fastllm.export.corpus import held_out_text
    from fastllm.export.precision import QuantOptions
    from fastllm.export.quantize import quantize_model

    name, method = PRECISIONS[precision]
    progress(f"{shape.name}: quantizing {src.name} to {precision} -> {out}")
    quantize_model(src, out, QuantOptions(name, method=method), text=held_out_text()[:4000], force=True,
                   overwrite=True, progress=lambda line: progress(f"{shape.name}: quantize: {line}"))


def _write_hf(shape: Shape, hf_dir: Path) -> int:
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = getattr(tf, shape.architecture)(shape.hf_config()).eval()
    model.save_pretrained(hf_dir)
    return sum(p.numel() for p in model.parameters())


def _write_tokenizer(hf_dir: Path) -> None:
    """Prompts are token ids, so any tokenizer will do for timing; peers' converters (onnxruntime-genai's builder)
    insist on one in the directory. A small one trained locally (export.tiny)."""
    import transformers as tf

    from fastllm.export.tiny import SPECIAL, train_tokenizer

    tf.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                               pad_token=SPECIAL[1], unk_token=None).save_pretrained(hf_dir)


def _usable_export(directory: Path, fingerprint: str) -> bool:
    """A cached model is re-used only if this fastllm reads its manifest and this exporter built it."""
    from fastllm.errors import FastLLMError
    from fastllm.manifest import Manifest

    if not (directory / "fastllm.json").is_file() or not (directory / STAMP).is_file():
        return False
    try:
        Manifest.read(directory)
    except FastLLMError:
        return False
    return (directory / STAMP).read_text() == fingerprint

"""fastllm.json: the versioned contract between export/ (which writes it) and the runtime (which reads it)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastllm.errors import ManifestError, ModelLoadError

FORMAT_VERSION = 1
MANIFEST_NAME = "fastllm.json"
REEXPORT_HINT = "re-export the model with `fastllm export SRC OUT` from this version of fastllm"

GRAPH_KINDS = ("fused", "portable")  # fused: ORT contrib ops, KV written in place; portable: plain ops, concat
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple  # ints for fixed dims, strings for symbolic ones

    @classmethod
    def from_dict(cls, d: dict) -> TensorInfo:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class GraphInfo:
    kind: str
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    # KV cache: per layer, one key and one value tensor laid out (batch, kv_heads, seq, head_dim).
    kv_layout: str = "batch,kv_heads,seq,head_dim"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    optimized: dict | None = None  # {"target": "cpu", "level": "extended", ...} when ORT's passes ran at export
    # a second graph for prompt chunks (`fastllm quantize --prefill`), same inputs and outputs, sharing the KV
    # cache: {"file": "prefill.onnx", "precision": "int8", "method": "dynamic", "optimized": {...}}
    prefill: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> GraphInfo:
        d = dict(d)
        d["inputs"] = tuple(TensorInfo.from_dict(t) for t in d["inputs"])
        d["outputs"] = tuple(TensorInfo.from_dict(t) for t in d["outputs"])
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    precision: str
    graph: GraphInfo
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    rope: dict | None = None
    quantization: dict | None = None
    tokenizer: str | None = "tokenizer.json"
    generation: dict = field(default_factory=dict)  # defaults from the source's generation_config
    verification: dict = field(default_factory=dict)  # what export measured against PyTorch
    source: dict = field(default_factory=dict)  # exporter and library versions, source path
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.graph.kind not in GRAPH_KINDS:
            raise ManifestError(f"graph kind {self.graph.kind!r} is unknown (known: {GRAPH_KINDS}); {REEXPORT_HINT}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision {self.precision!r} is unknown (known: {PRECISIONS}); {REEXPORT_HINT}")

    # -- names of the KV tensors ------------------------------------------------------------------------------
    def past_names(self, layer: int) -> tuple[str, str]:
        return self.graph.past_key.format(layer=layer), self.graph.past_value.format(layer=layer)

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.graph.present_key.format(layer=layer), self.graph.present_value.format(layer=layer)

    def input(self, name: str) -> TensorInfo:
        for t in self.graph.inputs:
            if t.name == name:
                return t
        raise ManifestError(f"fastllm.json names no graph input {name!r}; {REEXPORT_HINT}")

    @property
    def kv_dtype(self) -> str:
        return self.input(self.past_names(0)[0]).dtype

    # -- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        return {"format_version": d.pop("format_version"), **d}

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"fastllm.json has format_version {version!r}, this fastllm reads version {FORMAT_VERSION}; "
                f"{REEXPORT_HINT}"
            )
        d = dict(d)
        try:
            d["graph"] = GraphInfo.from_dict(d["graph"])
            d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"fastllm.json is incomplete or malformed ({e}); {REEXPORT_HINT}") from None

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest:
        directory = Path(directory)
        if not directory.exists():
            raise ModelLoadError(f"model directory {str(directory)!r} does not exist; pass the OUT directory of "
                                 "`fastllm export`")
        if not directory.is_dir():
            raise ModelLoadError(f"{str(directory)!r} is not a directory; pass the OUT directory of `fastllm export`")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ModelLoadError(f"{str(directory)!r} has no {MANIFEST_NAME}, so it is not a fastllm model directory; "
                                 "create one with `fastllm export SRC OUT`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); {REEXPORT_HINT}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path} does not hold a JSON object; {REEXPORT_HINT}")
        return cls.from_dict(data)

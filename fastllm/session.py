"""The ONNX Runtime session behind an engine: provider selection, threads, and checking the graph against the manifest."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # the runtime's ONNX Runtime build is an extra: one of two packages, never both
    raise ImportError("fastllm needs ONNX Runtime and none is installed: pip install 'fastllm[cpu]' "
                      "(or 'fastllm[gpu]' for CUDA)") from None

from fastllm.errors import DeviceError, InvalidParameterError, ManifestError, ModelLoadError
from fastllm.kv_cache import CACHES, capacity_for
from fastllm.manifest import REEXPORT_HINT, Manifest

_ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16"}


@dataclass(frozen=True)
class Device:
    """Where the session runs: ORT's device type name for OrtValues and IO binding, and the device index."""

    kind: str  # "cpu" | "cuda"
    index: int = 0

    @classmethod
    def parse(cls, device: str) -> Device:
        if not isinstance(device, str):
            raise InvalidParameterError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise InvalidParameterError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return cls(kind, int(index or 0))

    @property
    def provider(self) -> str:
        return {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[self.kind]

    def ortvalue(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.kind, self.index)


def providers_for(device: Device) -> list:
    available = ort.get_available_providers()
    if device.provider not in available:
        raise DeviceError(
            f"device {device.kind!r} needs {device.provider}, but this onnxruntime "
            f"({ort.__version__}, package {_ort_package()}) offers only {available}; "
            + ("install the GPU build with `pip install fastllm[gpu]` (onnxruntime-gpu, CUDA 12) "
               "or load with device='cpu'" if device.kind == "cuda" else "reinstall onnxruntime")
        )
    if device.kind == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_package() -> str:
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def _load_hint(manifest: Manifest) -> str:
    """What to do about a graph ONNX Runtime refused: a newer ONNX Runtime wrote it, or the file is damaged."""
    exported_with = (manifest.source or {}).get("versions", {}).get("onnxruntime")
    if exported_with and _version(exported_with) > _version(ort.__version__):
        return (f"the model was exported with onnxruntime {exported_with}, newer than this one; upgrade "
                f"(pip install -U 'onnxruntime>={exported_with}', or onnxruntime-gpu) or re-export it here")
    return "the file is corrupt or incomplete, re-export it with `fastllm export SRC OUT`"


PROFILE_ENV = "FASTLLM_ORT_PROFILE"  # set to a path prefix: sessions write ONNX Runtime profiles (bench.op_profile)


def session_options(threads: int | None, *, preoptimized: bool = False) -> ort.SessionOptions:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError(f"threads must be a positive integer or None (all cores), got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ORT picks the physical core count
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # a graph optimized at export for this device only needs the provider-independent passes
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if preoptimized
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    profile = os.environ.get(PROFILE_ENV)
    if profile:  # ONNX Runtime's profiler: one JSON of every kernel's time, written when the session ends
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return options


def open_session(directory: Path, manifest: Manifest, *, device: Device, threads: int | None,
                 prefill: bool = False) -> ort.InferenceSession:
    """The decode graph's session, or with `prefill` the prompt graph's (manifest.graph.prefill)."""
    graph = manifest.graph.prefill if prefill else None
    path = directory / (graph["file"] if graph else manifest.graph.file)
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; the model directory is incomplete, re-export it with "
                             "`fastllm export SRC OUT`")
    providers = providers_for(device)
    if device.kind == "cuda" and manifest.graph.kind == "fused" and manifest.precision == "fp32":
        raise DeviceError("this model's fused fp32 graph cannot run on CUDA: GroupQueryAttention's CUDA kernel takes "
                          "float16 only; export it with `fastllm export SRC OUT --precision fp16` for the GPU, "
                          "or load it with device='cpu'")
    if device.kind == "cpu" and manifest.precision == "fp16":
        warnings.warn("this model is fp16, which is meant for CUDA: on the CPU ONNX Runtime runs it slower than "
                      "fp32 (export fp32, int8 or int4 for the CPU)", RuntimeWarning, stacklevel=4)
    optimized = (graph.get("optimized") if graph else manifest.graph.optimized) or {}
    options = session_options(threads, preoptimized=optimized.get("target") == device.kind)
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"onnxruntime {ort.__version__} could not load {path}: {first_line}; "
                             + _load_hint(manifest)) from None
    if session.get_providers()[0] != device.provider:
        raise DeviceError(f"onnxruntime did not start {device.provider} (it runs {session.get_providers()}); "
                          "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or load with device='cpu'")
    check_graph(session, manifest, path.name)
    return session


def check_graph(session: ort.InferenceSession, manifest: Manifest, file: str | None = None) -> None:
    """Refuse a manifest that disagrees with the graph's inputs and outputs (the prompt graph's too: both are bound
    to the same buffers)."""
    for kind, declared, actual in (("input", manifest.graph.inputs, session.get_inputs()),
                                   ("output", manifest.graph.outputs, session.get_outputs())):
        graph = {t.name: _ORT_TYPES.get(t.type, t.type) for t in actual}
        listed = {t.name: t.dtype for t in declared}
        if graph != listed:
            missing = sorted(set(listed) - set(graph))
            extra = sorted(set(graph) - set(listed))
            wrong = sorted(n for n in set(graph) & set(listed) if graph[n] != listed[n])
            raise ManifestError(
                f"fastllm.json disagrees with {file or manifest.graph.file}'s {kind}s (in manifest only: {missing}, "
                f"in graph only: {extra}, dtype differs: {wrong}); {REEXPORT_HINT}"
            )


_KEEP_ONE = np.array(1, dtype=np.int64)


class Session:
    """One forward pass of the decoder graph per call, through a per-request IO binding."""

    def __init__(self, directory: Path, manifest: Manifest, *, device: Device, threads: int | None):
        self.manifest = manifest
        self.device = device
        self.threads = threads or os.cpu_count() or 1  # intra-op threads (None: ORT takes every core)
        self.ort = open_session(directory, manifest, device=device, threads=threads)
        # prompt chunks run here: the prompt graph when the model has one (`fastllm quantize --prefill`), else
        # the decode graph itself; both read and write the same KV buffers
        self.prefill_ort = (open_session(directory, manifest, device=device, threads=threads, prefill=True)
                            if manifest.graph.prefill else self.ort)
        self.input_names = {t.name for t in manifest.graph.inputs}

    def new_cache(self, batch: int, width: int, max_new_tokens: int):
        """The KV cache of one request: `batch` prompts of up to `width` tokens, then `max_new_tokens` steps."""
        return CACHES[self.manifest.graph.kind](self.manifest, self.device, batch,
                                                capacity_for(self.manifest, width, max_new_tokens))

    def forward(self, cache, binding: ort.IOBinding, feeds: dict[str, np.ndarray], *,
                out: np.ndarray | None = None, logits_to_keep: int = 1) -> np.ndarray:
        """Run one step with the inputs `cache.prefill()` or `cache.decode()` built.

        Returns logits (batch, logits_to_keep, vocab) on the host: written into `out` when given (a buffer
        allocated once per request), otherwise a new array.
        """
        for name, array in feeds.items():
            if name in self.input_names:  # graphs drop inputs they do not use (e.g. position_ids with rotary)
                binding.bind_cpu_input(name, array)
        binding.bind_cpu_input("logits_to_keep", _KEEP_ONE if logits_to_keep == 1 else
                               np.array(logits_to_keep, dtype=np.int64))
        if out is not None:
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))  # shares out's memory
        else:
            binding.bind_output("logits", "cpu")
        cache.bind(binding)
        self.ort.run_with_iobinding(binding)
        cache.advance(binding)
        return out if out is not None else binding.get_outputs()[0].numpy()

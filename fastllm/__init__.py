"""fastllm: run decoder language models exported to ONNX, with a KV cache, on ONNX Runtime.

    engine = fastllm.load("model_dir")
    print(engine.generate("Hello", fastllm.SamplingParams(max_new_tokens=32)).text)

The runtime imports only numpy, onnxruntime, tokenizers and jinja2; export lives in `fastllm.export` (the extra
`export`), which the runtime never imports.
"""

from fastllm.chat import ChatTemplate
from fastllm.engine import Completion, Engine, Step, load
from fastllm.errors import (
    ChatTemplateError,
    ContextLengthError,
    DeviceError,
    ExportError,
    FastLLMError,
    InvalidParameterError,
    InvalidPromptError,
    ManifestError,
    ModelLoadError,
    NoChatTemplateError,
    UnsupportedArchitectureError,
    VerificationError,
)
from fastllm.manifest import FORMAT_VERSION, Manifest
from fastllm.sampler import SamplingParams, TokenLogprob
from fastllm.score import Score

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ChatTemplate",
    "ChatTemplateError",
    "Completion",
    "ContextLengthError",
    "DeviceError",
    "Engine",
    "ExportError",
    "FastLLMError",
    "InvalidParameterError",
    "InvalidPromptError",
    "Manifest",
    "ManifestError",
    "ModelLoadError",
    "NoChatTemplateError",
    "SamplingParams",
    "Score",
    "Step",
    "TokenLogprob",
    "UnsupportedArchitectureError",
    "VerificationError",
    "load",
]

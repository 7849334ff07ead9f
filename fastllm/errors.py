"""Every error fastllm raises on purpose derives from FastLLMError; the message names the problem and the fix."""


class FastLLMError(Exception):
    """Base class of fastllm's errors."""


class ModelLoadError(FastLLMError):
    """The model directory is missing, incomplete or unreadable."""


class ManifestError(ModelLoadError):
    """fastllm.json has an unknown format version or disagrees with the ONNX graph."""


class UnsupportedArchitectureError(FastLLMError):
    """The source model's architecture (or one of its settings) has no exporter."""


class InvalidParameterError(FastLLMError, ValueError):
    """A sampling or load parameter is out of range."""


class InvalidPromptError(FastLLMError, ValueError):
    """The prompt is empty or holds token ids outside the vocabulary."""


class ChatTemplateError(InvalidParameterError):
    """The chat template cannot be read or compiled, or refused the messages (its raise_exception, or a render error)."""


class NoChatTemplateError(ChatTemplateError):
    """The model has no chat template and none was passed."""


class ContextLengthError(FastLLMError, ValueError):
    """Prompt plus requested new tokens do not fit in the model's context."""


class DeviceError(FastLLMError):
    """The requested device / execution provider cannot run here."""


class ExportError(FastLLMError):
    """A stage of the export pipeline failed."""


class VerificationError(ExportError):
    """The exported graph does not reproduce the PyTorch reference within tolerance."""


class QueueFullError(FastLLMError):
    """As many requests as the engine's max_queue already wait for a slot; retry later (HTTP 503)."""

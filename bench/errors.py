"""The harness's errors: FastLLMError subclasses, so `fastllm bench` prints them as one line."""

from fastllm.errors import FastLLMError


class BenchError(FastLLMError):
    """A benchmark could not be set up or run; the message says what to change."""

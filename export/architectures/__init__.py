"""Built-in architecture adapters; importing this package registers them."""

from fastllm.export.architectures import gpt2, llama, phi3  # noqa: F401

"""Built-in architecture adapters; importing this package registers them."""

from export.architectures import gpt2, llama, phi3  # noqa: F401

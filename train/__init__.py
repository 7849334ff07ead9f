"""Training the project's own small model (PyTorch), on text every Python install carries."""

"""longtrain: memory-efficient long-context training of Llama-family models on PyTorch."""

__version__ = "0.1.0"

"""Model adapter: HF Llama-family models split into pre-attention / attention core / post-attention."""

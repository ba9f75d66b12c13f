"""Build a Hugging Face Llama-family model from sizes (random init) or a local directory.

Library code beside the adapter: it imports nothing else of longtrain, so the checks of the user's
``model.*`` keys (the directory exists and holds a supported model) are the trainer's, made before
it calls here (``ModelConfig.check_path``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import SUPPORTED_FAMILIES


def _hf_classes(family: str) -> tuple[type, type]:
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model.family must be one of {', '.join(SUPPORTED_FAMILIES)}, got {family!r}")
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]


def head_dim_of(config: Any) -> int:
    """Size of one attention head of an HF config: its ``head_dim``, or hidden_size // heads where
    the config leaves it unset (Qwen2 configs have no head_dim attribute unless one is given)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hf_config_from_sizes(cfg: Any, vocab_size: int, seq_len: int) -> Any:
    """An HF config for ``cfg.family`` with the sizes of a ``ModelConfig``-like object (head_dim
    unset: the family's default, hidden_size // num_heads)."""
    config_cls, _ = _hf_classes(cfg.family)
    intermediate = cfg.intermediate_size or 64 * -(-int(8 * cfg.hidden_size / 3) // 64)
    kwargs = dict(
        vocab_size=cfg.vocab_size or vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings or max(seq_len, 2048),
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=0.0,
    )
    if cfg.head_dim is not None:
        kwargs["head_dim"] = cfg.head_dim
    if cfg.family == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    return config_cls(**kwargs)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model from a local HF directory (config.json + safetensors); no network."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path), local_files_only=True, dtype=dtype)


def build_hf_model(
    cfg: Any, *, vocab_size: int, seq_len: int, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``cfg.path`` set: load it; otherwise a randomly initialised model of ``cfg.family`` (seed first)."""
    if cfg.path:
        return load_hf_model(cfg.path, dtype)
    _, model_cls = _hf_classes(cfg.family)
    hf_config = hf_config_from_sizes(cfg, vocab_size, seq_len)
    model = model_cls(hf_config)
    return model.to(dtype)

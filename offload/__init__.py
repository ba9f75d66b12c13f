"""Activation memory: where saved activations live between forward and backward.

    apply_activation_memory(model, cfg)   # cfg: ActivationConfig or a dict with its keys

swaps the adapted model's layer executor; the model code itself never branches on the mode.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from longtrain.trainer.model.adapter import CausalLM, PlainExecutor, adapt

from .config import ActivationConfig
from .recompute import RecomputeExecutor

__all__ = ["ActivationConfig", "apply_activation_memory"]


def _as_config(cfg: ActivationConfig | dict[str, Any] | None) -> ActivationConfig:
    if cfg is None:
        return ActivationConfig()
    if isinstance(cfg, ActivationConfig):
        return cfg
    if isinstance(cfg, dict):
        known = set(asdict(ActivationConfig()))
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown activation key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return ActivationConfig(**cfg)
    raise TypeError(f"activation config must be an ActivationConfig or a dict, got {type(cfg).__name__}")


def apply_activation_memory(model: nn.Module, cfg: ActivationConfig | dict[str, Any] | None) -> CausalLM:
    """Install the activation-memory technique of ``cfg.mode`` on ``model`` (adapted first if it is
    a plain HF model; the adapted model shares its parameters) and return the model."""
    cfg = _as_config(cfg)
    model = adapt(model)
    if cfg.mode == "none":
        model.layer_executor = PlainExecutor()
    elif cfg.mode == "recompute":
        model.layer_executor = RecomputeExecutor()
    else:
        raise ValueError(f"activation.mode={cfg.mode} is not available yet; use none or recompute")
    return model

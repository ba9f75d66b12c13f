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
from .copy_engine import build_copy_engine
from .heap import build_heap_trimmer
from .profile import resolve_alpha
from .recompute import OffloadAllExecutor, RecomputeExecutor, TrimmedPlainExecutor
from .store import build_store
from .tokenwise import TokenwiseExecutor

__all__ = ["ActivationConfig", "activation_stats", "apply_activation_memory"]


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
    lm = adapt(model)
    previous: Any = getattr(lm, "layer_executor", None)
    if hasattr(previous, "close"):  # its copy threads and file-tier file
        previous.close()
    device = next(lm.parameters()).device
    # auto trims for the file tier only; true trims in every mode (the same allocator policy for all)
    trimmer = build_heap_trimmer(cfg.trim_heap, device.type, cfg.tier if cfg.mode == "tokenwise" else None)
    if cfg.mode == "none":
        lm.layer_executor = TrimmedPlainExecutor(trimmer) if trimmer.enabled else PlainExecutor()
    elif cfg.mode == "recompute":
        lm.layer_executor = RecomputeExecutor(trimmer)
    elif cfg.mode == "offload":
        lm.layer_executor = OffloadAllExecutor(trimmer)
    else:
        engine = build_copy_engine(build_store(cfg.tier, cfg.file_dir), device)
        params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        executor = TokenwiseExecutor(engine, cfg.alpha, cfg.keep_last, params, trimmer)
        if cfg.alpha == "auto":
            executor.alpha_resolver = lambda layers, x, ctx: resolve_alpha(executor, layers, x, ctx, cfg)
        lm.layer_executor = executor
    return lm


def activation_stats(model: nn.Module) -> dict[str, float]:
    """Last step's statistics: host_bytes, file_bytes, device_peak_bytes, recomputed_rows, copy times..."""
    executor = getattr(model, "layer_executor", None)
    stats = getattr(executor, "stats", None)
    base = {"host_bytes": 0, "file_bytes": 0, "device_peak_bytes": 0, "recomputed_rows": 0}
    return {**base, **(stats() if callable(stats) else {})}

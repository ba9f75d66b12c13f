"""Activation memory: where saved activations live between forward and backward.

    apply_activation_memory(model, cfg)   # cfg: ActivationConfig or a dict with its keys
    activation_stats(model)               # the executor's statistics of the last step
    measure(layers, x_th, ctx, store, parameter_storages(model)) -> LayerProfile

``apply_activation_memory`` swaps the adapted model's ``LayerExecutor``; the model code itself
never branches on the mode. ``measure`` profiles one layer (forward time, copy bandwidth, whole
and row bytes per token): what alpha="auto" uses, for a benchmark or planner to size a budget.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from longtrain.config_checks import ConfigError
from longtrain.trainer.model.adapter import CausalLM, LayerExecutor, PlainExecutor, adapt

from .config import ActivationConfig
from .copy_engine import build_copy_engine
from .heap import build_heap_trimmer
from .profile import LayerProfile, auto_alpha, measure
from .recompute import OffloadAllExecutor, RecomputeExecutor, TrimmedPlainExecutor
from .store import build_store
from .tokenwise import TokenwiseExecutor, parameter_storages

__all__ = [
    "ActivationConfig",
    "LayerExecutor",
    "LayerProfile",
    "activation_stats",
    "apply_activation_memory",
    "measure",
    "parameter_storages",
]


def _as_config(cfg: ActivationConfig | dict[str, Any] | None) -> ActivationConfig:
    if cfg is None:
        return ActivationConfig()
    if isinstance(cfg, ActivationConfig):
        return cfg
    if isinstance(cfg, dict):
        known = set(asdict(ActivationConfig()))
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown activation key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return ActivationConfig(**cfg)
    raise TypeError(f"activation config must be an ActivationConfig or a dict, got {type(cfg).__name__}")


def apply_activation_memory(model: nn.Module, cfg: ActivationConfig | dict[str, Any] | None) -> CausalLM:
    """Install the activation-memory technique of ``cfg.mode`` on ``model`` (adapted first if it is
    a plain HF model; the adapted model shares its parameters) and return the model."""
    cfg = _as_config(cfg)
    lm = adapt(model)
    executor: LayerExecutor
    device = next(lm.parameters()).device
    # auto trims for the tokenwise file tier only; true trims in every mode (one allocator policy for
    # all). Built before the store: it may raise.
    trimmer = build_heap_trimmer(cfg.trim_heap, device.type, cfg.tier if cfg.mode == "tokenwise" else None)
    if cfg.mode == "none":
        executor = TrimmedPlainExecutor(trimmer) if trimmer.enabled else PlainExecutor()
    elif cfg.mode == "recompute":
        executor = RecomputeExecutor(trimmer)
    elif cfg.mode == "offload":
        executor = OffloadAllExecutor(trimmer)
    else:
        engine = build_copy_engine(build_store(cfg.tier, cfg.file_dir), device)
        params = parameter_storages(lm)
        tokenwise = TokenwiseExecutor(engine, cfg.alpha, cfg.keep_last, params, trimmer)
        if cfg.alpha == "auto":
            tokenwise.alpha_resolver = lambda layers, x, ctx: auto_alpha(
                layers, x, ctx, engine.store, params, cfg
            )
        executor = tokenwise
    lm.layer_executor.close()  # the previous executor's copy threads and file-tier file
    lm.layer_executor = executor
    return lm


def activation_stats(model: CausalLM) -> dict[str, float]:
    """Last step's statistics: host_bytes, file_bytes, device_peak_bytes, recomputed_rows, copy times..."""
    base = {"host_bytes": 0, "file_bytes": 0, "device_peak_bytes": 0, "recomputed_rows": 0}
    return {**base, **model.layer_executor.stats()}

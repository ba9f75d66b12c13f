"""Activation memory: where saved activations live between forward and backward.

    apply_activation_memory(model, cfg)   # cfg: ActivationConfig (uniform, or activation.plan=FILE),
                                          # a dict with its keys, or an ActivationPlan (per layer)
    activation_stats(model)               # the executor's statistics of the last step
    measure(layers, x_th, ctx, store) -> LayerProfile

``apply_activation_memory`` swaps the adapted model's ``LayerExecutor``; the model code itself
never branches on the mode. mode none / recompute / offload run the baselines (the real torch
mechanisms); tokenwise and every per-layer plan run one executor (``TokenwiseExecutor``) in which
each layer is kept, recomputed or token-wise swapped with its own alpha and tier. ``measure``
profiles one layer (forward time, copy bandwidth, whole and row bytes per token): what
alpha="auto" uses, for a benchmark or planner to size a budget.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtrain.config_checks import ConfigError
from longtrain.trainer.model.adapter import CausalLM, LayerExecutor, PlainExecutor, adapt

from .alpha_record import AlphaRecord
from .config import ActivationConfig
from .copy_engine import build_copy_engine
from .heap import build_heap_trimmer
from .link import emulate_link
from .plan import ActivationPlan, LayerPlan, load_plan
from .profile import LayerProfile, auto_alphas, measure
from .recompute import OffloadAllExecutor, RecomputeExecutor, TrimmedPlainExecutor
from .store import ActivationStore, build_store
from .tokenwise import TokenwiseExecutor, parameter_storages

__all__ = [
    "ActivationConfig",
    "ActivationPlan",
    "LayerExecutor",
    "LayerPlan",
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


def apply_activation_memory(
    model: nn.Module,
    cfg: ActivationConfig | ActivationPlan | dict[str, Any] | None,
    alpha_record: str | Path | None = None,
) -> CausalLM:
    """Install the activation-memory technique ``cfg`` describes on ``model`` (adapted first if it
    is a plain HF model; the adapted model shares its parameters) and return the model. A rejected
    config raises ConfigError and leaves the model's executor as it was. ``alpha_record``: a JSON
    file where alpha="auto" keeps what it resolves and reads it back in a later process of the same
    job (``alpha_record.py``), so a resumed run computes the first run's floats."""
    lm = adapt(model)
    device = next(lm.parameters()).device
    executor: LayerExecutor
    if isinstance(cfg, ActivationPlan):
        cfg.check_layer_count(lm.num_layers)
        executor = _plan_executor(cfg, cfg.tiers(), lm, device, alpha_record)
    else:
        cfg = _as_config(cfg)
        if cfg.plan is not None:
            plan = load_plan(cfg, lm.num_layers)
            executor = _plan_executor(plan, plan.tiers(), lm, device, alpha_record)
        elif cfg.mode == "tokenwise":
            # a uniform config opens its tier even when every layer is kept, so a bad
            # activation.file_dir fails now, not on the day keep_last is lowered
            plan = ActivationPlan.from_config(cfg, lm.num_layers)
            executor = _plan_executor(plan, [cfg.tier], lm, device, alpha_record)
        else:
            executor = _baseline(cfg, device)
    lm.layer_executor.close()  # the previous executor's copy threads and file-tier file
    lm.layer_executor = executor
    return lm


def _baseline(cfg: ActivationConfig, device: torch.device) -> LayerExecutor:
    """mode none / recompute / offload: the real torch mechanism for every layer. trim_heap=true
    trims in every mode (one allocator policy for all); auto trims only the tokenwise file tier."""
    trimmer = build_heap_trimmer(cfg.trim_heap, device.type, None)
    if cfg.mode == "none":
        return TrimmedPlainExecutor(trimmer) if trimmer.enabled else PlainExecutor()
    if cfg.mode == "recompute":
        return RecomputeExecutor(trimmer, cfg.tile_rows)
    return OffloadAllExecutor(trimmer)


def _plan_executor(
    plan: ActivationPlan,
    tiers: list[str],
    lm: CausalLM,
    device: torch.device,
    alpha_record: str | Path | None = None,
) -> TokenwiseExecutor:
    """One store (behind the emulated link, if any) and copy engine per tier in ``tiers`` (those of
    the plan's tokenwise layers at least); alpha="auto" layers resolved on the first step of every
    length."""
    # auto trims for the tokenwise file tier only. Built before the stores: it may raise.
    trimmer = build_heap_trimmer(plan.trim_heap, device.type, "file" if "file" in tiers else None)
    stores: dict[str, ActivationStore] = {}
    try:
        for tier in tiers:
            stores[tier] = build_store(tier, plan.file_dir)
            stores[tier] = emulate_link(stores[tier], plan.link_gbps, device)
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    engines = {tier: build_copy_engine(store, device) for tier, store in stores.items()}
    executor = TokenwiseExecutor(engines, plan, trimmer)
    if any(layer.mode == "tokenwise" and layer.alpha == "auto" for layer in plan.layers):
        record = None if alpha_record is None else AlphaRecord(alpha_record, _record_key(plan, lm, device))

        def resolve(
            layers: list[Any], x_th: torch.Tensor, ctx: Any
        ) -> tuple[list[float | str], dict[str, Any]]:
            kept = None if record is None else record.get(x_th.shape[0])
            if kept is not None:
                return kept, {}
            alphas, profiles = auto_alphas(plan, layers, x_th, ctx, stores)
            if record is not None:
                record.put(x_th.shape[0], alphas)
            return alphas, profiles

        executor.alpha_resolver = resolve
    return executor


def _record_key(plan: ActivationPlan, lm: CausalLM, device: torch.device) -> dict[str, Any]:
    """What recorded alphas were resolved for: the plan, the device and one layer's parameters."""
    layer = lm.layer_parts[0].module
    params = {name: [list(p.shape), str(p.dtype)] for name, p in layer.named_parameters()}
    return {"plan": asdict(plan), "device": device.type, "layers": lm.num_layers, "layer": params}


def activation_stats(model: CausalLM) -> dict[str, float]:
    """Last step's statistics: host_bytes, file_bytes, device_peak_bytes, recomputed_rows, copy
    times, and per tokenwise layer i: layer{i}_{tier}_bytes, layer{i}_alpha, layer{i}_recomputed_rows."""
    base = {"host_bytes": 0, "file_bytes": 0, "device_peak_bytes": 0, "recomputed_rows": 0}
    return {**base, **model.layer_executor.stats()}

"""The optimizer container and learning-rate schedule from ``OptimConfig``.

``build_optimizer`` splits the trainable parameters into sub-groups, places each sub-group's state
on a tier (``placement.py``; for ``optim.offload=auto`` the ILP of ``solver.py`` over the tiers
this host has, from bandwidths measured at start-up), checks everything a user can get wrong (budget, NVMe directory, CXL
node, CPU AdamW implementation) and returns the ``OptimizerContainer`` (``container.py``).
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch import nn

from longtrain.config_checks import ConfigError
from longtrain.offload.direct_io import check_dir

from . import solver
from .bandwidth import cxl_gbps, disk_gbps, dram_stream_gbps
from .config import OptimConfig
from .container import OptimizerContainer
from .cpu_adam import resolve_cpu_impl
from .placement import Placement, place_subgroups, split_subgroups
from .tiers import node_free_bytes, resolve_cxl_node

if TYPE_CHECKING:
    from longtrain.parallel.fsdp import ShardedParams


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay matrices; never decay norms, biases or other 1-D parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _defaults(cfg: OptimConfig) -> dict[str, Any]:
    if cfg.name == "adamw":
        betas = (float(cfg.betas[0]), float(cfg.betas[1]))  # OptimConfig checks there are two
        return {"lr": cfg.lr, "betas": betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}


def auto_problem(
    state_bytes: Sequence[int], cfg: OptimConfig, dram_bytes: int, backward_s: float = 0.0
) -> solver.Problem:
    """The placement problem of ``optim.offload=auto``: dram (``dram_bytes`` for state and staging),
    nvme when ``optim.nvme_dir`` is set (its free space), cxl when the host has a CPU-less NUMA node
    (its free memory; the emulated tier is DRAM and would hold no more), with measured bandwidths.
    The device tier has no budget key yet, so auto never chooses it."""
    capacity: dict[str, int | None] = {"dram": dram_bytes}
    rates: dict[str, float] = {"dram_gbps": dram_stream_gbps(), "cxl_latency_s": cfg.cxl_latency_us * 1e-6}
    if cfg.nvme_dir is not None:
        path = check_dir(cfg.nvme_dir, "optim.nvme_dir")
        capacity["nvme"] = shutil.disk_usage(path).free
        rates["nvme_read_gbps"], rates["nvme_write_gbps"] = disk_gbps(path)
    node = resolve_cxl_node(cfg.cxl_node)
    if node is not None:
        capacity["cxl"] = node_free_bytes(node)
        rates["cxl_gbps"] = cxl_gbps(node, cfg.cxl_bandwidth_gbps)
    return solver.Problem(
        tuple(state_bytes), capacity, solver.Rates(**rates), backward_s=backward_s, clip=cfg.grad_clip > 0
    )


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    overlap_backward: bool = True,
    placement: Placement | None = None,
    backward_s: float = 0.0,
    shards: ShardedParams | None = None,
) -> OptimizerContainer:
    """The container over ``model``'s trainable parameters.

    ``overlap_backward``: updates may start during the last backward of a step (False under data
    parallelism: gradients are final only after their sync). ``placement``: the tier of each
    sub-group (a solver's answer), instead of the rule of ``place_subgroups`` for ``cfg.offload``.
    ``backward_s``: the expected time of the last backward, which staged reads can hide behind (the
    auto placement's cost model; 0: nothing hides behind backward). ``shards``: the model is sharded
    (parallel/fsdp.py); the container updates these local shards.
    """
    params = shards.local if shards is not None else [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(params, cfg.weight_decay)
    if not params:
        raise ValueError("the model has no trainable parameters")
    subgroups = [
        [params[i] for i in idx] for idx in split_subgroups([p.numel() for p in params], cfg.subgroup_params)
    ]
    dtype = params[0].dtype
    state_bytes = [2 * sum(p.numel() for p in sub) * dtype.itemsize for sub in subgroups]
    if placement is None:
        budget = cfg.dram_budget_bytes
        if cfg.offload == "auto" and budget is None:
            budget = psutil.virtual_memory().available // 2
        # On CUDA the host tiers update in a pinned buffer of [parameters | gradients] of the largest
        # sub-group (no per-step allocation), whatever the placement.
        cuda_work = 2 * max(state_bytes) if params[0].device.type == "cuda" and cfg.offload != "none" else 0
        # The rule first: it rejects a budget that holds no sub-group, and is the ILP's fallback.
        placement = place_subgroups(state_bytes, cfg.offload, budget, fixed_bytes=cuda_work)
        if cfg.offload == "auto":
            assert budget is not None
            problem = auto_problem(state_bytes, cfg, budget - cuda_work, backward_s)
            placement = solver.solve(problem, placement)
            if placement.solver == "greedy":
                warnings.warn(
                    f"optim.offload=auto: the placement ILP gave up ({placement.note}); "
                    "the sub-groups are placed by the greedy rule",
                    stacklevel=2,
                )
    elif len(placement.tiers) != len(subgroups):
        raise ValueError(f"placement has {len(placement.tiers)} tiers for {len(subgroups)} sub-groups")
    tiers = set(placement.tiers)
    if cfg.name != "adamw" and tiers != {"device"}:
        raise ConfigError(f"optim.offload needs optim.name=adamw, got optim.name={cfg.name}")
    if "nvme" in tiers and cfg.nvme_dir is None:
        raise ConfigError(
            f"optim.offload={cfg.offload} puts optimizer state on nvme (it does not fit "
            "optim.dram_budget_bytes) and needs optim.nvme_dir (a directory on a local NVMe disk)"
        )
    cxl_node = resolve_cxl_node(cfg.cxl_node) if "cxl" in tiers else None
    cpu_impl = resolve_cpu_impl(cfg.cpu_impl, dtype) if tiers != {"device"} else "torch"
    return OptimizerContainer(
        groups,
        _defaults(cfg),
        subgroups,
        placement,
        cfg,
        cpu_impl=cpu_impl,
        cxl_node=cxl_node,
        overlap_backward=overlap_backward and shards is None,  # sharded gradients arrive after reduce-scatter
        shards=shards,
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups"]

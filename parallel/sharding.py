"""``apply_sharding``: how the trainer holds model states over the data-parallel ranks.

    sharding = apply_sharding(cfg.parallel, model, mesh)   # after the activation executor is set
    optimizer = build_optimizer(model, cfg.optim, shards=sharding.shards)
    per micro-batch: sharding.grad_sync.before_backward(last); backward
    per step:        sharding.grad_sync.after_backward(); optimizer.clip_and_step()

``parallel.shard=none``: replicated states, gradients all-reduced after the step's last backward.
``parallel.shard=fsdp``: FSDP2 (parallel/fsdp.py). With one process there is nothing to shard
over: a warning, and the job runs unsharded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

from longtrain.trainer.model.adapter import CausalLM

from .config import ParallelConfig
from .mesh import Mesh, ReplicatedGradientSync


class GradientSync(Protocol):
    def before_backward(self, last: bool) -> None:
        """Before each micro-batch's backward; ``last``: the step's last one."""
        ...

    def after_backward(self) -> None:
        """After the step's last backward: gradients are final on every rank when it returns."""
        ...


@dataclass
class Sharding:
    grad_sync: GradientSync
    shards: object | None = None  # parallel.fsdp.ShardedParams: what the optimizer updates

    @property
    def sharded(self) -> bool:
        return self.shards is not None


def apply_sharding(cfg: ParallelConfig, model: CausalLM, mesh: Mesh) -> Sharding:
    if cfg.shard == "fsdp":
        if mesh.device_mesh is None:
            warnings.warn(
                "parallel.shard=fsdp with a single process shards nothing; running unsharded "
                "(launch with --nproc N or torchrun to shard over N ranks)",
                stacklevel=2,
            )
        else:
            from .fsdp import FsdpGradientSync, ShardedParams, apply_fsdp

            # every rank holds a replica's worth of gradients to sum: shard over dp x cp (the cp
            # ranks of a group see different rows of the same documents)
            dm = mesh.device_mesh
            shard_mesh = dm["dp"] if mesh.cp_size == 1 else dm["dp", "cp"]._flatten("dp_cp")
            apply_fsdp(model, shard_mesh)
            return Sharding(FsdpGradientSync(model), ShardedParams(model, shard_mesh.get_group()))
    return Sharding(ReplicatedGradientSync(model, mesh))

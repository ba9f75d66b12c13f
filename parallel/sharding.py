"""``apply_sharding``: how the trainer holds model states over the data-parallel ranks.

    sharding = apply_sharding(cfg.parallel, model, mesh)   # after the activation executor is set
    optimizer = build_optimizer(model, cfg.optim, shards=sharding.shards)
    per micro-batch: sharding.grad_sync.before_backward(last); forward through
                     ``sharding.forward or model``; sharding.grad_sync.backward(loss)
    per step:        sharding.grad_sync.after_backward(); optimizer.clip_and_step()

``parallel.shard=none``: replicated states, gradients all-reduced after the step's last backward.
``parallel.shard=fsdp``: FSDP2 (parallel/fsdp.py). With one process there is nothing to shard
over: a warning, and the job runs unsharded.
``parallel.shard=deepspeed``: a DeepSpeed ZeRO-3 engine (parallel/zero3.py) that owns the forward,
the backward and its optimizer (``Sharding.forward``, ``Sharding.optimizer``); one process: the
same warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from longtrain.trainer.model.adapter import CausalLM

from .config import ParallelConfig
from .mesh import Mesh, ReplicatedGradientSync
from .zero3 import Zero3Spec

if TYPE_CHECKING:
    from .fsdp import ShardedParams


class GradientSync(Protocol):
    def before_backward(self, last: bool) -> None:
        """Before each micro-batch's backward; ``last``: the step's last one."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Backward of one micro-batch's loss (already over the step's global token count)."""
        ...

    def after_backward(self) -> None:
        """After the step's last backward: gradients are final on every rank when it returns."""
        ...


@dataclass
class Sharding:
    grad_sync: GradientSync
    shards: ShardedParams | None = None  # sharded: the local shards the optimizer updates
    forward: Callable[..., Any] | None = (
        None  # what the loop calls for a forward if not the model (an engine)
    )
    optimizer: Any = None  # an optimizer the engine owns (zero3.EngineOptimizer), else None

    @property
    def sharded(self) -> bool:
        return self.shards is not None


def apply_sharding(
    cfg: ParallelConfig, model: CausalLM, mesh: Mesh, zero3: Zero3Spec | None = None
) -> Sharding:
    """``zero3``: what the DeepSpeed engine's config is derived from (needed for shard=deepspeed)."""
    if cfg.shard == "none":
        return Sharding(ReplicatedGradientSync(model, mesh))
    if mesh.device_mesh is None:
        warnings.warn(
            f"parallel.shard={cfg.shard} with a single process shards nothing; running unsharded "
            "(launch with --nproc N or torchrun to shard over N ranks)",
            stacklevel=2,
        )
        return Sharding(ReplicatedGradientSync(model, mesh))
    if cfg.shard == "deepspeed":
        if zero3 is None:
            raise ValueError("parallel.shard=deepspeed needs the engine's Zero3Spec")
        from .zero3 import apply_zero3

        forward, sync, optimizer = apply_zero3(model, zero3, mesh)
        return Sharding(sync, forward=forward, optimizer=optimizer)
    from .fsdp import FsdpGradientSync, ShardedParams, apply_fsdp

    # every rank holds a replica's worth of gradients to sum: shard over dp x cp (the cp ranks of a
    # group see different rows of the same documents)
    dm = mesh.device_mesh
    shard_mesh = dm["dp"] if mesh.cp_size == 1 else dm["dp", "cp"]._flatten("dp_cp")
    apply_fsdp(model, shard_mesh)
    return Sharding(FsdpGradientSync(model), ShardedParams(model, shard_mesh.get_group()))

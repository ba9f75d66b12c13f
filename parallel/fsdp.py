"""Sharded model states with FSDP2 (``parallel.shard=fsdp``): parameters, gradients and optimizer
state split over the data-parallel ranks of the ``DeviceMesh``.

    apply_fsdp(model, mesh)            # fully_shard every decoder layer, then the root
    shards = ShardedParams(model, mesh)  # the optimizer container's view of the local shards
    sync = FsdpGradientSync(model)     # gradient sync per micro-batch (reduce-scatter on the last)

The seam: longtrain's executors never call a decoder layer's ``forward``; they run each layer's
forward through ``LayerParts.call`` (trainer/model/adapter.py), a method of the HF decoder layer
that ``register_fsdp_forward_method`` turns into a forward for FSDP: its pre-forward hook all-gathers
the layer's parameters, its post-forward hook frees them and hooks the layer output, so backward
all-gathers them again before the layer's backward starts. Token-wise rebuilds and tile reruns run
inside the layer's backward, so they see the unsharded weights; the gradients are reduce-scattered
once the layer's input gradient is done (``reshard_after_forward``: the default, ZeRO-3).

Token-weighted loss: every rank's loss is its token-loss sum over the *global* token count, so the
gradients must be summed over ranks, not averaged: the divide factor is 1. Gradient accumulation:
only the last micro-batch of a step reduce-scatters (``set_requires_gradient_sync``); the others
accumulate unsharded gradients locally.

The optimizer container works on plain tensors: ``ShardedParams`` gives it one leaf per sharded
parameter that shares the local shard's storage (its in-place update is the DTensor's), hands it the
local gradient shards before a step, and sums the squared gradient norm over the shard group for
clipping, so the clipped update equals ``clip_grad_norm_`` over the full gradients.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from longtrain.trainer.model.adapter import LAYER_METHOD, CausalLM

__all__ = ["FsdpGradientSync", "ShardedParams", "apply_fsdp"]


def apply_fsdp(model: CausalLM, dp_mesh: DeviceMesh) -> None:
    """Shard ``model`` over ``dp_mesh`` (1-D): each decoder layer is its own unit (all-gathered for
    its forward and backward only), the root holds the embedding, final norm and head."""
    for parts in model.layer_parts:
        fully_shard(parts.module, mesh=dp_mesh)
        register_fsdp_forward_method(parts.module, LAYER_METHOD)
    fully_shard(model, mesh=dp_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already over the global token count
            # float32 would otherwise reduce with PREMUL_SUM(1.0), which gloo lacks: a plain SUM
            module.set_force_sum_reduction_for_comms(True)


class FsdpGradientSync:
    """Reduce-scatter gradients on a step's last micro-batch only (the others accumulate locally)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def before_backward(self, last: bool) -> None:
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(last)  # recurses into the layers

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def after_backward(self) -> None:
        """Nothing: FSDP reduce-scattered during the last backward."""


class ShardedParams:
    """The local shards of ``model``'s trainable FSDP2 parameters as plain leaf tensors for the
    optimizer container, and the collectives its step needs (see the module docstring)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None):
        self.group = group
        self.sharded: list[DTensor] = []
        self.local: list[nn.Parameter] = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not sharded; apply_fsdp first")
            self.sharded.append(p)
            # shares the shard's storage: the container's in-place update is the sharded parameter's
            self.local.append(nn.Parameter(p.to_local().detach(), requires_grad=True))
        self._by_local = {id(loc): p for loc, p in zip(self.local, self.sharded, strict=True)}

    def pull_grads(self) -> None:
        """Give every local leaf its gradient shard (after the step's last backward)."""
        for loc, p in zip(self.local, self.sharded, strict=True):
            grad = p.grad
            loc.grad = None if grad is None else grad.to_local()  # type: ignore[attr-defined]

    def drop_grads(self) -> None:
        for loc, p in zip(self.local, self.sharded, strict=True):
            loc.grad = None
            p.grad = None

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        """Sum over the shard group (a squared norm of local shards -> of the full gradients)."""
        out = value.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def full(self, local: nn.Parameter, value: Tensor) -> Tensor:
        """The full tensor of a per-parameter state ``value`` sharded like ``local``'s parameter
        (collective: every rank calls it, in the same order)."""
        p = self._by_local[id(local)]
        return DTensor.from_local(
            value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        ).full_tensor()

    def shard(self, local: nn.Parameter, value: Tensor) -> Tensor:
        """This rank's shard of a full per-parameter state ``value`` (inverse of ``full``)."""
        p = self._by_local[id(local)]
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local()


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict on CPU, on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full state dict (every rank holds it) into the sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

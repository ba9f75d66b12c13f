"""The process layout of a job, passed explicitly (no module globals)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longtrain.config_checks import ConfigError

from .config import ParallelConfig


@dataclass
class Mesh:
    """rank/world_size over all processes; dp_rank/dp_size along the data-parallel axis, cp_rank/
    cp_size along the context-parallel axis (rank = dp_rank * cp_size + cp_rank).
    ``device_mesh``: the named layout ("dp", "cp") of a distributed job (None in one process); its
    process groups are what collectives are given (``dp_group``, ``cp_group``; the world group for
    job totals)."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    device_mesh: DeviceMesh | None = None
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.device_mesh is None else self.device_mesh.get_group("dp")

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return None if self.device_mesh is None else self.device_mesh.get_group("cp")

    @property
    def cp_ranks(self) -> tuple[int, ...]:
        """The global ranks of this rank's cp group, in cp order (a ring's order)."""
        first = self.rank - self.cp_rank
        return tuple(range(first, first + self.cp_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device=cuda but no CUDA device is available; set train.device=cpu or auto"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_mesh(cfg: ParallelConfig, device_name: str) -> Mesh:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a 1-rank mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(device_name)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    dp_size = cfg.resolve_data_parallel(world_size)
    cp_size = cfg.context_parallel
    device_mesh = None
    if world_size > 1:
        device_mesh = init_device_mesh(device.type, (dp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return Mesh(
        rank=rank,
        world_size=world_size,
        dp_rank=rank // cp_size,  # the mesh is row-major: a cp group is consecutive ranks
        dp_size=dp_size,
        device=device,
        device_mesh=device_mesh,
        cp_rank=rank % cp_size,
        cp_size=cp_size,
    )


def all_reduce_sum(value: float | int, mesh: Mesh) -> float:
    """Sum a host scalar over all ranks (token counts, loss sums)."""
    if not mesh.distributed:
        return value
    t = torch.tensor(
        [float(value)], dtype=torch.float64, device=mesh.device if mesh.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t, group=dist.group.WORLD)
    return t.item()


def all_reduce_sums(values: list[float], mesh: Mesh) -> list[float]:
    """Sum several host scalars over all ranks in one collective."""
    if not mesh.distributed:
        return list(values)
    t = torch.tensor(
        [float(v) for v in values],
        dtype=torch.float64,
        device=mesh.device if mesh.device.type == "cuda" else "cpu",
    )
    dist.all_reduce(t, group=dist.group.WORLD)
    return t.tolist()


def broadcast_object(obj: Any, mesh: Mesh, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (decisions only one rank may take)."""
    if not mesh.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=dist.group.WORLD)
    return box[0]


def sync_gradients(model: nn.Module, mesh: Mesh, bucket_bytes: int = 25 * 2**20) -> None:
    """Sum gradients over all ranks (every rank holds a replica: dp ranks, and the cp ranks that
    share a document).

    Each rank's loss is its token-loss sum divided by the *global* token count, so the sum of the
    ranks' gradients is the gradient of the global mean: ranks may hold different token counts,
    and under hdp run different numbers of micro-batches. A rank that ran none has no gradients
    yet: zeros take their place, so that every rank reduces the same buckets.
    Gradients are flattened into ~25 MiB buckets: few collectives, bounded extra memory.
    """
    if not mesh.distributed:
        return
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=dist.group.WORLD)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive same-dtype gradients, about ``bucket_bytes`` per bucket (bounded extra memory)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or buckets[-1][0].dtype != g.dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    return buckets


class ReplicatedGradientSync:
    """Replicated model states (``parallel.shard=none``): gradients summed over all ranks after a
    step's last backward (``sync_gradients``)."""

    def __init__(self, model: nn.Module, mesh: Mesh):
        self.model, self.mesh = model, mesh

    def before_backward(self, last: bool) -> None:
        """Nothing: gradients accumulate locally until the step's sync."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def after_backward(self) -> None:
        sync_gradients(self.model, self.mesh)


def shutdown(mesh: Mesh) -> None:
    if mesh.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""One sub-group: its tensors, the library optimizer that updates them, where its m, v are bound.

The inner optimizer is ``torch.optim.AdamW`` (or SGD) over the parameters on the device tier, and
a CPU AdamW (``cpu_adam.py``) on the host tiers. Its ``state`` is created here, not lazily by the
optimizer, so that ``exp_avg`` / ``exp_avg_sq`` are views of tier memory: the device or dram home
(bound once) or a staging slot (bound before every update, ``bind``). On a CPU device the CPU
AdamW works on the parameters and ``p.grad`` themselves; on CUDA on views of one pinned host
buffer [parameters | gradients] that ``host_grads`` fills and ``copy_back`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from longtrain.offload.memory import host_empty

from .cpu_adam import make_cpu_adam


@dataclass
class SubGroup:
    index: int
    tier: str
    params: list[nn.Parameter]  # whole tensors, model order
    offsets: list[int]  # element offset of each tensor in m (and, after numel, in v)
    numel: int
    inner: torch.optim.Optimizer
    work: list[Tensor]  # what ``inner`` updates: the parameters, or their host copies on CUDA
    home: Tensor | None  # flat [2 * numel] state on the device or dram tier; None when staged
    inner_public: list[int]  # the container's param_groups index of each of inner.param_groups
    grad_views: list[Tensor] = field(default_factory=list)  # CUDA: host gradient of each tensor

    @property
    def state_bytes(self) -> int:
        return 2 * self.numel * self.params[0].dtype.itemsize

    def bind(self, flat: Tensor) -> None:
        """Point the inner AdamW's m, v at ``flat`` ([2 * numel] of the dtype, or a uint8 slot)."""
        dtype = self.params[0].dtype
        if flat.dtype != dtype:
            flat = flat[: self.state_bytes].view(dtype)
        n = self.numel
        for o, w in zip(self.offsets, self.work, strict=True):
            st = self.inner.state[w]
            st["exp_avg"] = flat[o : o + w.numel()].view_as(w)
            st["exp_avg_sq"] = flat[n + o : n + o + w.numel()].view_as(w)

    def host_grads(self) -> list[Tensor]:
        """The gradients ``inner`` reads (on CUDA copied, with the parameters, to the host buffer;
        a tensor without a gradient gets none and the inner optimizer skips it)."""
        if not self.grad_views:
            return [p.grad for p in self.params if p.grad is not None]
        grads = []
        for p, w, gv in zip(self.params, self.work, self.grad_views, strict=True):
            w.grad = None if p.grad is None else gv
            if p.grad is not None:
                w.copy_(p.detach())
                gv.copy_(p.grad)
                grads.append(gv)
        return grads

    def copy_back(self) -> None:
        """CUDA: the updated host copies back into the parameters."""
        if self.grad_views:
            for p, w in zip(self.params, self.work, strict=True):
                if p.grad is not None:
                    p.detach().copy_(w)


def work_buffer(params: list[nn.Parameter], numel: int) -> Tensor | None:
    """On CUDA: the pinned host buffer [parameters | gradients] of ``numel`` each that the host
    tiers update in (allocated once, reused by every sub-group in turn)."""
    if params[0].device.type == "cpu" or numel == 0:
        return None
    dtype = params[0].dtype
    return host_empty(2 * numel * dtype.itemsize, pin=True).view(dtype)


def build_subgroup(
    index: int,
    params: list[nn.Parameter],
    tier: str,
    public_groups: list[dict[str, Any]],
    *,
    algorithm: str,
    cpu_impl: str,
    work_buf: Tensor | None,
) -> SubGroup:
    """Sub-group ``index`` on ``tier``; ``public_groups``: the container's param_groups."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"sub-group {index} mixes parameter dtypes {sorted(map(str, dtypes))}")
    dtype, device = params[0].dtype, params[0].device
    offsets, numel = [], 0
    for p in params:
        offsets.append(numel)
        numel += p.numel()
    work: list[Tensor] = list(params)
    grad_views: list[Tensor] = []
    if tier != "device" and work_buf is not None:
        half = work_buf.numel() // 2
        work = [work_buf[o : o + p.numel()].view_as(p) for o, p in zip(offsets, params, strict=True)]
        grad_views = [
            work_buf[half + o : half + o + p.numel()].view_as(p) for o, p in zip(offsets, params, strict=True)
        ]
    group_of = {p: gi for gi, group in enumerate(public_groups) for p in group["params"]}
    inner_groups, inner_public = [], []
    for gi, group in enumerate(public_groups):
        mine = [w for w, p in zip(work, params, strict=True) if group_of[p] == gi]
        if mine:
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
            inner_public.append(gi)
    home = None
    if tier == "device":
        if algorithm == "sgd":
            inner: torch.optim.Optimizer = torch.optim.SGD(inner_groups, lr=public_groups[0]["lr"])
        else:
            inner = torch.optim.AdamW(inner_groups)
            home = torch.zeros(2 * numel, dtype=dtype, device=device)
    else:
        inner = make_cpu_adam(cpu_impl, inner_groups)
        if tier == "dram":
            home = host_empty(2 * numel * dtype.itemsize, pin=device.type == "cuda").view(dtype).zero_()
    g = SubGroup(index, tier, params, offsets, numel, inner, work, home, inner_public, grad_views)
    if algorithm == "adamw":
        int_step = tier != "device" and cpu_impl == "deepspeed"  # DeepSpeedCPUAdam counts in an int
        for w in work:
            inner.state[w] = {"step": 0 if int_step else torch.tensor(0.0, dtype=torch.float32)}
        if home is not None:
            g.bind(home)
    return g

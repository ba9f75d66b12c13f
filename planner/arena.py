"""One pre-allocated byte buffer per device, handing out tensors at planned offsets.

    arena = Arena(layout.peak, device)
    x_th = arena.view(offset, torch.bfloat16, (t, h))   # a view: no allocation

The runtime side of the layout (layout.py): every tensor the plan places is a dtype view of the
buffer at its offset, so the device sees one allocation of exactly the planned peak and nothing
can fragment it. ``replay`` runs a recorded trace through an arena: each tensor is created as a
view when the trace allocates it, filled with its own pattern, and checked when the trace frees
it, so a layout that let two live tensors share bytes fails the replay. (Serving the transient
allocations of the model's own ops at planned offsets needs an allocator hook on CUDA; on CPU the
planned layouts are verified by this replay.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import Layout
from .trace import Block


class Arena:
    def __init__(self, nbytes: int, device: torch.device | str = "cpu"):
        if nbytes < 0:
            raise ValueError(f"arena size must be >= 0, got {nbytes}")
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def view(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
        """A ``dtype`` tensor of ``shape`` over the bytes from ``offset`` (which the plan aligned)."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside the {self.nbytes}-byte arena")
        if offset % dtype.itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype} ({dtype.itemsize} bytes)")
        return self.buffer[offset : offset + nbytes].view(dtype).view(tuple(shape))


@dataclass(frozen=True)
class Replay:
    reserved: int  # bytes the arena holds (one allocation)
    planned_peak: int
    max_live: int  # the trace's bytes live at once (unrounded)
    tensors: int

    @property
    def fragmentation(self) -> int:
        """Reserved bytes beyond the plan's peak (0: the arena is exactly the plan)."""
        return self.reserved - self.planned_peak


def replay(blocks: Sequence[Block], layout: Layout, device: torch.device | str = "cpu") -> Replay:
    """Run ``blocks`` (one phase of a trace, in the order ``layout`` planned them) through an arena
    of the layout's peak; raises if a tensor's bytes change while it is live."""
    if len(blocks) != len(layout.offsets):
        raise ValueError(f"{len(blocks)} blocks but the layout places {len(layout.offsets)}")
    arena = Arena(layout.peak, device)
    events = sorted(
        [(b.alloc, 1, i) for i, b in enumerate(blocks)] + [(b.free, 0, i) for i, b in enumerate(blocks)]
    )
    live: dict[int, Tensor] = {}
    live_bytes = max_live = 0
    for _, is_alloc, i in events:
        b = blocks[i]
        if is_alloc:
            dtype = getattr(torch, b.dtype.removeprefix("torch."))
            numel = 1
            for d in b.shape:
                numel *= d
            # The storage may be larger than the first tensor on it; fill it all as raw bytes.
            t = arena.view(layout.offsets[i], dtype, b.shape) if numel * dtype.itemsize == b.size else None
            raw = arena.view(layout.offsets[i], torch.uint8, (b.size,))
            raw.fill_(i % 251 + 1)
            live[i] = raw if t is None else t
            live_bytes += b.size
            max_live = max(max_live, live_bytes)
        else:
            raw = live.pop(i).view(-1).view(torch.uint8)
            if not bool((raw == i % 251 + 1).all()):
                raise AssertionError(f"block {i} ({b.op}, {b.size} bytes) was overwritten while live")
            live_bytes -= b.size
    return Replay(reserved=arena.nbytes, planned_peak=layout.peak, max_live=max_live, tensors=len(blocks))

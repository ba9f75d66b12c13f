"""The baselines: plain autograd, full layer recompute (torch.utils.checkpoint) and offload-everything
(torch.autograd.graph.save_on_cpu, the behaviour of torchtune's activation offloading).

Each runs the real torch mechanism per layer. With heap trimming on (``activation.trim_heap``), a
baseline trims at the same layer boundaries as the token-wise executor: before every layer's
forward after the first, and when a layer's backward begins (a hook on the layer's output
gradient). That is the allocator policy a fair memory comparison gives every system.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer

from .heap import HeapTrimmer
from .tiles import checkpointed_tiled


def checkpointed(parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> Tensor:
    return checkpoint(run_layer, parts, x_th, ctx, use_reentrant=False)


class _Baseline:
    """Runs every layer with ``run_one`` inside ``saving()``; trims the heap at layer boundaries."""

    run_one: Callable[[LayerParts, Tensor, LayerContext], Tensor] = staticmethod(run_layer)

    def __init__(self, trim_heap: HeapTrimmer | None = None):
        self.trim_heap = trim_heap or HeapTrimmer(False)

    def saving(self, x_th: Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _trim_on_grad(self, grad: Tensor) -> None:
        self.trim_heap()  # this layer's backward starts: the layer above has freed its tensors

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        self.trim_heap.reset()
        with self.saving(x_th):
            for i, parts in enumerate(layers):
                if i:
                    self.trim_heap()  # the previous layer's transient tensors are free now
                x_th = parts.call(functools.partial(self.run_one, parts), x_th, ctx)
                if self.trim_heap.enabled and x_th.requires_grad:
                    x_th.register_hook(self._trim_on_grad)
        return x_th

    def stats(self) -> dict[str, float]:
        return {"heap_trims": self.trim_heap.calls, "heap_trim_s": self.trim_heap.seconds}

    def close(self) -> None:
        """Nothing to release: the baselines own no threads or files."""


class TrimmedPlainExecutor(_Baseline):
    """Plain autograd (every saved activation stays on the device), trimming the heap between layers."""


class RecomputeExecutor(_Baseline):
    """Every layer is re-run in backward from its saved input (the recompute baseline); with
    ``tile_rows`` its row-wise parts run on tiles, each re-run again in its own backward."""

    def __init__(self, trim_heap: HeapTrimmer | None = None, tile_rows: int | str = 0):
        super().__init__(trim_heap)
        self.tile_rows = tile_rows

    def run_one(self, parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> Tensor:  # type: ignore[override]
        if self.tile_rows:
            return checkpointed_tiled(parts, x_th, ctx, self.tile_rows)
        return checkpointed(parts, x_th, ctx)


class OffloadAllExecutor(_Baseline):
    """Every saved tensor of every layer goes to host memory (pinned on CUDA) and comes back in backward."""

    def saving(self, x_th: Tensor) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.save_on_cpu(pin_memory=x_th.is_cuda)

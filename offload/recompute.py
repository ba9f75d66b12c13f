"""The two baselines: full layer recompute (torch.utils.checkpoint) and offload-everything
(torch.autograd.graph.save_on_cpu, the behaviour of torchtune's activation offloading)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer


class RecomputeExecutor:
    """Every layer is re-run in backward from its saved input (the recompute baseline)."""

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        for parts in layers:
            x_th = checkpoint(run_layer, parts, x_th, ctx, use_reentrant=False)
        return x_th

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class OffloadAllExecutor:
    """Every saved tensor of every layer goes to host memory (pinned on CUDA) and comes back in backward."""

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        with torch.autograd.graph.save_on_cpu(pin_memory=x_th.is_cuda):
            for parts in layers:
                x_th = run_layer(parts, x_th, ctx)
        return x_th

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

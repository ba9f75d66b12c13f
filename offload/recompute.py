"""Full layer recompute: autograd keeps only each layer's input (torch.utils.checkpoint)."""

from __future__ import annotations

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer


class RecomputeExecutor:
    """Every layer is re-run in backward from its saved input (the recompute baseline)."""

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        for parts in layers:
            x_th = checkpoint(run_layer, parts, x_th, ctx, use_reentrant=False)
        return x_th

"""Tiled row-wise compute: a layer's row-wise parts run over row tiles of ``tile_rows`` tokens.

The row-wise parts of a decoder layer (pre-attention: norm, q/k/v projections, RoPE;
post-attention: o_proj, residual, norm, MLP) map every token row on its own, so they can run on
row tiles: the input is split into tiles, each tile runs as its own small graph, and the tile
outputs are concatenated. Autograd keeps each tile's saved tensors separately and runs the tiles'
backward one after the other (a later tile's nodes all have higher sequence numbers), so whoever
decides where saved tensors live (the token-wise executor; a checkpoint per tile) holds them one
tile at a time: the transient memory of one layer grows with ``tile_rows x intermediate_size``,
not ``seq x intermediate_size``. Weight gradients are summed over tiles by autograd (one
accumulation per parameter and backward): not bit-equal to one big matmul, hence float64
oracles for tiled runs.

Tile boundaries sit on multiples of ``tile_rows`` rounded to ``cost.ROW_ALIGN``, the BLAS
row-tile boundary, so a tile recomputed in backward gives the floats the forward produced (the
token-wise cut ``a`` is a multiple of ROW_ALIGN too and becomes one more boundary).

``tile_rows = "auto"``: the largest tile whose MLP intermediates (four tile x intermediate
tensors) hold no more bytes than the layer input (seq x hidden), at least ``AUTO_MIN_ROWS``
rows (below that the per-tile overhead shows): the transient becomes about one more layer input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longtrain.trainer.model.adapter import LayerContext, LayerParts

from .cost import ROW_ALIGN

__all__ = [
    "AUTO_MIN_ROWS",
    "checkpointed_tiled",
    "resolve_tile_rows",
    "run_layer_tiled",
    "tile_bounds",
    "tiled_post_attention",
    "tiled_pre_attention",
]

AUTO_MIN_ROWS = 256
MLP_INTERMEDIATES = 4  # gate, up, act(gate), act(gate) * up: the MLP's seq x intermediate tensors

Bounds = list[tuple[int, int]]
# called before each tile runs, with the tile's (segment, start, end): the executor labels what it saves
BeforeTile = Callable[[str, int, int], None]


def resolve_tile_rows(tile_rows: int | str, t: int, hidden: int, intermediate: int) -> int:
    """Rows per tile for a sequence of ``t`` rows: 0 (no tiling) when one tile would hold them all,
    else a multiple of ROW_ALIGN."""
    if tile_rows == "auto":
        rows = max(AUTO_MIN_ROWS, (t * hidden) // (MLP_INTERMEDIATES * intermediate))
    else:
        rows = int(tile_rows)
    if rows <= 0 or rows >= t:
        return 0
    return max(ROW_ALIGN, rows - rows % ROW_ALIGN)


def tile_bounds(t: int, tile_rows: int, cut: int = 0) -> Bounds:
    """[start, end) of each tile of rows [0, t): boundaries at the multiples of ``tile_rows`` and at
    ``cut`` (0 or t: none), so no tile straddles the cut. ``tile_rows`` 0: the whole rows."""
    edges = {0, t}
    if 0 < cut < t:
        edges.add(cut)
    if tile_rows > 0:
        edges.update(range(tile_rows, t, tile_rows))
    points = sorted(edges)
    return list(zip(points[:-1], points[1:], strict=True))


def _sizes(bounds: Bounds) -> list[int]:
    return [e - s for s, e in bounds]


def tiled_pre_attention(
    parts: LayerParts,
    x_th: Tensor,
    cos_td: Tensor,
    sin_td: Tensor,
    bounds: Bounds,
    before_tile: BeforeTile | None = None,
    run: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``parts.pre_attention`` over row tiles: q, k, v of all rows (concatenated)."""
    if len(bounds) == 1:
        if before_tile is not None:
            before_tile("pre", *bounds[0])
        return (run or parts.pre_attention)(x_th, cos_td, sin_td)
    sizes = _sizes(bounds)
    qs, ks, vs = [], [], []
    for (s, e), x_j, cos_j, sin_j in zip(
        bounds, x_th.split(sizes), cos_td.split(sizes), sin_td.split(sizes), strict=True
    ):
        if before_tile is not None:
            before_tile("pre", s, e)
        q, k, v = (run or parts.pre_attention)(x_j, cos_j, sin_j)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def tiled_post_attention(
    parts: LayerParts,
    x_th: Tensor,
    attn_tnd: Tensor,
    bounds: Bounds,
    before_tile: BeforeTile | None = None,
    run: Callable[..., Tensor] | None = None,
) -> Tensor:
    """``parts.post_attention`` over row tiles: the layer output of all rows (concatenated)."""
    if len(bounds) == 1:
        if before_tile is not None:
            before_tile("post", *bounds[0])
        return (run or parts.post_attention)(x_th, attn_tnd)
    sizes = _sizes(bounds)
    outs = []
    for (s, e), x_j, o_j in zip(bounds, x_th.split(sizes), attn_tnd.split(sizes), strict=True):
        if before_tile is not None:
            before_tile("post", s, e)
        outs.append((run or parts.post_attention)(x_j, o_j))
    return torch.cat(outs)


def _checkpoint_each(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` with only its inputs saved: re-run in its own backward (one tile at a time)."""

    def run(*args: Tensor) -> object:
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def run_layer_tiled(parts: LayerParts, x_th: Tensor, ctx: LayerContext, tile_rows: int | str) -> Tensor:
    """The layer with its row-wise parts on tiles, each tile checkpointed (re-run in its own backward);
    ``tile_rows`` 0 (or a tile as long as the sequence) is the plain layer."""
    t = x_th.shape[0]
    rows = resolve_tile_rows(tile_rows, t, x_th.shape[1], parts.gate_proj.out_features)
    bounds = tile_bounds(t, rows)
    if len(bounds) == 1:
        q, k, v = parts.pre_attention(x_th, ctx.cos_td, ctx.sin_td)
        out_tnd, _lse = ctx.attention(parts, q, k, v)
        return parts.post_attention(x_th, out_tnd)
    pre = _checkpoint_each(parts.pre_attention)
    post = _checkpoint_each(parts.post_attention)
    q, k, v = tiled_pre_attention(parts, x_th, ctx.cos_td, ctx.sin_td, bounds, run=pre)  # type: ignore[arg-type]
    out_tnd, _lse = ctx.attention(parts, q, k, v)
    return tiled_post_attention(parts, x_th, out_tnd, bounds, run=post)  # type: ignore[arg-type]


def checkpointed_tiled(parts: LayerParts, x_th: Tensor, ctx: LayerContext, tile_rows: int | str) -> Tensor:
    """Full layer recompute with tiles: torch.utils.checkpoint of ``run_layer_tiled`` (only the
    layer input is held; in backward the layer is re-run, and each tile again in its own backward,
    so the MLP runs three times, as in the ALST stack)."""
    return checkpoint(run_layer_tiled, parts, x_th, ctx, tile_rows, use_reentrant=False)

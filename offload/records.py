"""What the token-wise executor records about one offloaded layer's saved tensors.

A layer's forward leaves a ``LayerRecord``: one ``Slot`` per saved tensor (kept by reference, a
view of a whole tensor, a whole tensor, or token rows), the ``Whole`` tensors offloaded in full,
and the copies in flight. Autograd holds a ``Handle`` instead of each saved tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from .copy_engine import Copy
from .plan import ActivationPlan


def storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def parameter_storages(model: torch.nn.Module) -> set[int]:
    """Storage keys of ``model``'s parameters: a saved tensor in one of them is never an activation.
    A sharded parameter (DTensor) counts by its local shard; its unsharded copy, which is what a
    layer saves, is counted when the layer runs (``LayerParts.parameters`` inside ``call``)."""
    return {storage_key(_local(p)) for p in model.parameters()}


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor: its shard on this rank
    return to_local() if to_local is not None else t


def view_key(t: Tensor) -> tuple:
    return (storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def is_param_like(t: Tensor, param_storages: set[int]) -> bool:
    """A parameter, or an autocast cast of one (ToCopyBackward straight from an AccumulateGrad), or a
    view of such a cast (under autocast ``linear`` saves ``weight_cast.t()``, a TBackward0 view)."""
    if storage_key(t) in param_storages:
        return True
    fn = (t._base if t._base is not None else t).grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0":
        nxt = fn.next_functions
        if len(nxt) == 1 and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad":
            # .variable: the AccumulateGrad node's parameter (torch's Node stub does not declare it)
            return storage_key(cast(Any, nxt[0][0]).variable) in param_storages
    return False


def nbytes_of(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Handle:
    """What autograd holds instead of a saved tensor; weakly tracked to detect pending graphs."""

    __slots__ = ("vkey", "__weakref__")

    def __init__(self, vkey: tuple):
        self.vkey = vkey


@dataclass
class Slot:
    """One saved tensor of an offloaded layer."""

    kind: str  # "keep" | "view" | "whole" | "rows" | "tile" | "pending" (saved by the core, classified after it)
    tensor: Tensor | None = None  # keep: the tensor itself
    whole: int = -1  # view, whole: index of the whole tensor
    size: tuple = ()
    stride: tuple = ()
    offset: int = 0
    row: int = -1  # rows: index among the layer's row slots; tile: index among the tile's saved tensors
    tile: int = -1  # tile: index of the tile in the layer's tiles
    refs: int = 0  # unpacks still to come


@dataclass
class Whole:
    key: tuple
    base_offset: int
    numel: int
    requires_grad: bool  # as in forward: the rerun must save what the forward saved (frozen embeddings)
    copy: Copy | None = None
    value: Tensor | None = None


@dataclass
class Tile:
    """One row tile of a tiled layer's pre- or post-attention: its saved tensors are offloaded
    (a head tile, rows below the cut) or dropped and recomputed before its backward (a tail tile)."""

    segment: str  # "pre" | "post"
    start: int
    end: int
    head: bool
    shapes: list[tuple] = field(default_factory=list)  # of its saved tensors, in saving order
    copies: list[Copy] = field(default_factory=list)  # forward: offloads in flight (head tiles)
    fetches: list[Copy] = field(default_factory=list)  # backward: reads in flight (head tiles)
    values: list[Tensor | None] = field(default_factory=list)  # backward: fetched or recomputed
    alive: list[Tensor] = field(default_factory=list)  # forward: packed tensors kept alive while it runs
    staged_bytes: int = 0
    fetched: bool = False  # its reads were started (head tiles)
    ready: bool = False  # values hold its saved tensors


@dataclass
class LayerRecord:
    index: int
    t: int
    a: int
    autocast: tuple
    engine: Any  # the copy engine of the layer's tier
    wholes: list[Whole] = field(default_factory=list)
    whole_by_storage: dict[int, int] = field(default_factory=dict)
    slots: dict[tuple, Slot] = field(default_factory=dict)
    row_shapes: list[tuple] = field(default_factory=list)
    row_copies: list[Copy | None] = field(default_factory=list)  # forward: head-row offloads
    head_fetch: list[Copy | None] = field(default_factory=list)  # backward: head-row reads
    full_rows: list[Tensor | None] = field(default_factory=list)  # backward: reassembled tensors
    x_whole: int = -1  # index in wholes of the layer input
    out_whole: int = -1  # index in wholes of the attention output
    qkv_rows: dict[str, int] = field(default_factory=dict)  # "q"/"k"/"v" -> row slot, where the core saved it
    core_saves: list[tuple[tuple, Tensor]] = field(default_factory=list)  # (view key, tensor) to classify
    segments: dict[str, list[int]] = field(default_factory=dict)  # row slot indices of pre / post
    whole_bytes: int = 0  # bytes sent to the store: whole tensors
    row_bytes: int = 0  # bytes sent to the store: head rows
    alive: list[Tensor] = field(default_factory=list)  # packed tensors kept alive during the layer's forward
    staged_bytes: int = 0  # device bytes held until this layer's offloads complete
    resident_bytes: int = 0  # device bytes of fetched/rebuilt tensors during its backward
    param_keys: set[int] = field(default_factory=set)  # storages of parameters (never activations)
    tile_rows: int = 0  # 0: untiled; else the row-wise parts ran on ``tiles``
    tiles: list[Tile] = field(default_factory=list)
    tile_current: int = -1  # forward: the tile whose saved tensors are being packed
    pending_refs: int = 0
    handles: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    prefetched: bool = False
    rebuilt: bool = False  # whole tensors fetched (at the layer's first unpack)
    rows_rebuilt: bool = False  # row slots reassembled (at the first unpack of one)
    x_rereads: int = 0  # backward: times the layer input was read again after its eviction


def step_stats(
    plan: ActivationPlan, alphas: list[float | str], records: dict[int, LayerRecord], t: int
) -> dict[str, Any]:
    """One step's bytes per tier and per tokenwise layer (``records``, by layer index), counted at
    submission: the copy threads may still be filling the stores, so reading store.nbytes() would
    race with the last layers' copies."""
    totals = {"host_bytes": 0, "file_bytes": 0}
    per_layer: dict[str, Any] = {}
    cuts: set[tuple[float | str, int]] = set()
    for i, rec in records.items():
        tier = plan.layers[i].tier
        offloaded = rec.whole_bytes + rec.row_bytes
        totals[f"{tier}_bytes"] += offloaded
        per_layer[f"layer{i}_{tier}_bytes"] = offloaded
        per_layer[f"layer{i}_alpha"] = alphas[i]
        per_layer[f"layer{i}_recomputed_rows"] = t - rec.a
        per_layer[f"layer{i}_tile_rows"] = rec.tile_rows
        per_layer[f"layer{i}_input_rereads"] = 0  # the backward counts them (stats())
        cuts.add((alphas[i], rec.a))
    stats: dict[str, Any] = {
        **totals,
        "offloaded_layers": len(records),
        "recomputed_rows": sum(t - rec.a for rec in records.values()),
        "recomputed_layers": sum(layer.mode == "recompute" for layer in plan.layers),
    }
    if len(cuts) == 1:  # one alpha for every tokenwise layer (a uniform config)
        ((stats["alpha"], stats["offload_rows_per_layer"]),) = cuts
    return {**stats, **per_layer}

"""Token-wise activation swap/recompute (MEMO) as the layer executor of an ``ActivationPlan``.

The plan (``plan.py``) gives every layer a mode: ``keep`` (plain autograd, with the saved bytes
counted), ``recompute`` (torch.utils.checkpoint) or ``tokenwise`` with its own alpha and tier (one
store and copy engine per tier). For every tokenwise layer, autograd runs as usual but each tensor
it saves for backward passes through ``torch.autograd.graph.saved_tensors_hooks``:

    parameters (and their autocast casts), RoPE tables   kept by reference (resident anyway)
    layer input x, attention output + logsumexp           offloaded whole ("whole" tensors)
    views of a whole tensor                               remembered as (whole, size, stride, offset)
    q, k, v as the attention core saves them              token rows (below), rebuilt by pre-attention
    anything else the attention core saves                offloaded whole (attention is not recomputed)
    every other saved tensor with t token rows            first a = split_row(alpha, t) rows offloaded,
                                                          rows [a, t) dropped
    anything else (scalars)                               kept on the device

The attention core is one call, ``ctx.attention(parts, q, k, v) -> (out, lse)``: the executor
registers the returned out and lse as whole tensors itself and knows q, k, v as the arguments it
passed. What the core saved for its backward is classified after the call returns, against
those tensors, so the order (or number) of the core's saves never matters.

Before the layer's backward (its first unpack), rows [a, t) are rebuilt by re-running the
layer's row-wise parts on x[a:] (pre-attention) and on (x[a:], out[a:]) (post-attention) under a
capturing hook: the same op sequence on fewer rows saves the same tensors in the same order,
each holding exactly the missing rows. Attention is never recomputed; q, k, v tail rows come
from the pre-attention rerun. A count or shape mismatch raises (never silently wrong gradients).

Schedule: offloads of tokenwise layer i run on its tier's d2h queue while later layers compute;
layer i waits for the copies of every tokenwise layer up to i-2 (two layers in flight). In
backward, the next tokenwise layer below is prefetched when a tokenwise layer's rebuild starts,
and the last tokenwise layer as soon as the forward ends.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer

from .cost import split_row
from .heap import HeapTrimmer
from .plan import ActivationPlan
from .recompute import checkpointed
from .records import (
    Handle,
    LayerRecord,
    Slot,
    Tile,
    Whole,
    is_param_like,
    nbytes_of,
    parameter_storages,
    step_stats,
    storage_key,
    view_key,
)
from .tiles import (
    checkpointed_tiled,
    resolve_tile_rows,
    tile_bounds,
    tiled_post_attention,
    tiled_pre_attention,
)

if TYPE_CHECKING:
    from .profile import LayerProfile

__all__ = ["TokenwiseExecutor", "parameter_storages"]

# alpha="auto": measures the layer and each tier's link at a new length ->
# (every layer's alpha, each tier's measurement)
AlphaResolver = Callable[
    [list[LayerParts], Tensor, LayerContext], tuple[list[float | str], dict[str, "LayerProfile"]]
]


class TokenwiseExecutor:
    """Runs the decoder layers as ``plan`` says (see the module docstring); ``engines``: the copy
    engine of every tier the plan's tokenwise layers use."""

    def __init__(
        self,
        engines: Mapping[str, Any],
        plan: ActivationPlan,
        trim_heap: HeapTrimmer | None = None,
    ):
        missing = set(plan.tiers()) - set(engines)
        if missing:
            raise ValueError(f"no copy engine for the plan's tier(s) {sorted(missing)}")
        self.engines = dict(engines)
        self.plan = plan
        self.trim_heap = trim_heap or HeapTrimmer(False)
        self.alphas: list[float | str] = [layer.alpha for layer in plan.layers]  # "auto" until resolved
        self.alpha_resolver: AlphaResolver | None = None
        self.profiles: dict[str, LayerProfile] = {}  # what alpha_resolver last measured, per tier
        self.records: dict[int, LayerRecord] = {}
        self._layers: list[LayerParts] = []
        self._ctx: LayerContext | None = None
        self._stats: dict[str, Any] = {}
        self._device_bytes = 0
        self._device_peak = 0
        self._step = 0  # forwards run: a recompute layer's hook frees its input only in its own step
        self._kept_refs: dict[int, int] = {}  # kept layers: saved storage -> packs not yet unpacked
        self._param_keys: set[int] = set()  # kept layers: the running layer's parameter storages
        self._kept_shared: set[int] = set()  # RoPE tables of this step (shared by all layers)
        self._alpha_t = -1

    @property
    def engine(self) -> Any:
        """The copy engine of the first tier (the only one of a uniform config)."""
        if not self.engines:
            raise AttributeError("this plan has no tokenwise layer, so no copy engine")
        return next(iter(self.engines.values()))

    @property
    def alpha(self) -> float | str | None:
        """The alpha all tokenwise layers share ("auto" until resolved); None if they differ or there
        are none."""
        values = {self.alphas[i] for i, layer in enumerate(self.plan.layers) if layer.mode == "tokenwise"}
        return values.pop() if len(values) == 1 else None

    @property
    def profile(self) -> LayerProfile | None:
        """The measurement of the first tier alpha="auto" measured."""
        return next(iter(self.profiles.values()), None)

    # ---------------------------------------------------------------- accounting
    def _device_add(self, n: int) -> None:
        self._device_bytes += n
        self._device_peak = max(self._device_peak, self._device_bytes)

    def _device_sub(self, n: int) -> None:
        self._device_bytes -= n

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (logged to metrics.jsonl by the trainer): totals, then
        ``layer{i}_{tier}_bytes``, ``layer{i}_alpha``, ``layer{i}_recomputed_rows`` and
        ``layer{i}_input_rereads`` (reads of the layer input evicted during the attention backward)
        for every tokenwise layer i."""
        copy_s = sum(e.timer.copy_s for e in self.engines.values())
        exposed_s = sum(e.timer.exposed_s for e in self.engines.values())
        stats: dict[str, float] = {
            "host_bytes": 0,
            "file_bytes": 0,
            **self._stats,
            "device_peak_bytes": self._device_peak,
            "copy_s": copy_s,
            "copy_exposed_s": exposed_s,
            "copy_hidden_s": copy_s - min(exposed_s, copy_s),
            "heap_trims": self.trim_heap.calls,
            "heap_trim_s": self.trim_heap.seconds,
        }
        for i, rec in self.records.items():  # counted during the backward
            stats[f"layer{i}_input_rereads"] = rec.x_rereads
        if self.plan.link_gbps is not None:
            stats["link_emulated_gbps"] = self.plan.link_gbps
        return stats

    # ---------------------------------------------------------------- forward
    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        if not torch.is_grad_enabled():  # nothing is saved for backward: run plainly
            for parts in layers:
                x_th = parts.call(functools.partial(run_layer, parts), x_th, ctx)
            return x_th
        self.plan.check_layer_count(len(layers))
        self._release_step()
        self._layers, self._ctx = layers, ctx
        t = x_th.shape[0]
        if self.alpha_resolver is not None and self._alpha_t != t:
            (self.alphas, self.profiles), self._alpha_t = self.alpha_resolver(layers, x_th, ctx), t
        self._kept_shared = {storage_key(ctx.cos_td), storage_key(ctx.sin_td)}
        for parts, layer in zip(layers, self.plan.layers, strict=True):
            i = parts.index
            if layer.mode == "tokenwise":
                for j in [j for j in self.records if j <= i - 2]:
                    self._wait_offloads(j)  # layer i reuses layer i-2's buffer
                if i >= 2:
                    self.trim_heap()  # layer i-2's saved tensors are free now
                a = split_row(float(self.alphas[i]), t)  # "auto" was resolved above
                rows = resolve_tile_rows(layer.tile_rows, t, x_th.shape[1], parts.gate_proj.out_features)
                engine = self.engines[layer.tier]
                x_th = parts.call(
                    functools.partial(self._forward_offloaded, parts), x_th, ctx, t, a, engine, rows
                )
            elif layer.mode == "recompute":
                x_th = parts.call(
                    functools.partial(self._forward_recomputed, parts), x_th, ctx, layer.tile_rows
                )
            else:
                x_th = parts.call(functools.partial(self._forward_kept, parts), x_th, ctx)
        self._stats = step_stats(self.plan, self.alphas, self.records, t)
        if self.records:  # the last tokenwise layer's backward follows the layers above it
            self._prefetch(max(self.records))
        return x_th

    def _forward_recomputed(
        self, parts: LayerParts, x_th: Tensor, ctx: LayerContext, tile_rows: int | str
    ) -> Tensor:
        """torch.utils.checkpoint: only the layer input is held (counted until the layer's backward
        begins); the layer is re-run in backward (on tiles, each re-run again in its own backward)."""
        y_th = (
            checkpointed_tiled(parts, x_th, ctx, tile_rows) if tile_rows else checkpointed(parts, x_th, ctx)
        )
        held, step = nbytes_of(x_th), self._step
        self._device_add(held)
        if y_th.requires_grad:

            def release(grad: Tensor) -> None:
                if self._step == step:  # not a graph of an earlier step
                    self._device_sub(held)

            y_th.register_hook(release)
        return y_th

    def _forward_kept(self, parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> Tensor:
        self._param_keys = parameter_storages(parts.module)
        with torch.autograd.graph.saved_tensors_hooks(self._pack_kept, self._unpack_kept):
            return run_layer(parts, x_th, ctx)

    def _pack_kept(self, tensor: Tensor) -> tuple[Tensor, int | None]:
        """Kept layers: count each saved storage once (a tensor saved by several ops, e.g. the norm
        output read by q, k and v, is held once); parameters and the RoPE tables are resident anyway."""
        key = storage_key(tensor)
        if key in self._kept_shared or is_param_like(tensor, self._param_keys):
            return tensor, None
        if key not in self._kept_refs:
            self._device_add(tensor.untyped_storage().nbytes())
        self._kept_refs[key] = self._kept_refs.get(key, 0) + 1
        # detached: a tensor saved by the node that produced it (rsqrt saves its output) would
        # otherwise hold its own grad_fn, a cycle through C++ that the garbage collector cannot see,
        # so a graph dropped without backward would never be freed (nor this step's records).
        return tensor.detach(), key

    def _unpack_kept(self, packed: tuple[Tensor, int | None]) -> Tensor:
        tensor, key = packed
        if key is not None and key in self._kept_refs:
            self._kept_refs[key] -= 1
            if self._kept_refs[key] == 0:
                del self._kept_refs[key]
                self._device_sub(tensor.untyped_storage().nbytes())
        return tensor

    def _forward_offloaded(
        self,
        parts: LayerParts,
        x_th: Tensor,
        ctx: LayerContext,
        t: int,
        a: int,
        engine: Any,
        tile_rows: int = 0,
    ) -> Tensor:
        """One tokenwise layer (``a``: rows [0, a) offloaded); ``tile_rows`` > 0: its row-wise parts
        run on tiles cut at ``a`` too, each tile's saved tensors offloaded whole (below ``a``) or
        recomputed on their own before the tile's backward."""
        dev = x_th.device.type
        rec = LayerRecord(
            parts.index, t, a, (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev), engine
        )
        rec.tile_rows = tile_rows
        self.records[parts.index] = rec
        # The layer's parameter storages as they are now (never stale keys: under sharding the unsharded
        # copies of this call, whose memory is freed after it and may then hold activations).
        rec.param_keys = parameter_storages(parts.module)
        shared = {storage_key(ctx.cos_td), storage_key(ctx.sin_td)}
        rec.x_whole = self._add_whole(rec, x_th)

        def pack(segment: str):
            def hook(tensor: Tensor):
                return self._pack(rec, segment, tensor, shared)

            return hook

        unpack = lambda key: self._unpack(rec, key)  # noqa: E731
        bounds = tile_bounds(t, tile_rows, a) if tile_rows else [(0, t)]
        begin = (lambda segment, s, e: self._begin_tile(rec, segment, s, e)) if tile_rows else None
        with torch.autograd.graph.saved_tensors_hooks(pack("pre"), unpack):
            q, k, v = tiled_pre_attention(parts, x_th, ctx.cos_td, ctx.sin_td, bounds, begin)
        with torch.autograd.graph.saved_tensors_hooks(pack("attn"), unpack):
            out_tnd, lse = ctx.attention(parts, q, k, v)
        rec.out_whole = self._add_whole(rec, out_tnd)
        self._add_whole(rec, lse)
        self._classify_core_saves(rec, {"q": q, "k": k, "v": v})
        with torch.autograd.graph.saved_tensors_hooks(pack("post"), unpack):
            y_th = tiled_post_attention(parts, x_th, out_tnd, bounds, begin)
        # Packed tensors were held so that a freed tensor's memory, reused by a later tensor of the same
        # shape, can never alias an earlier slot; the copies in flight keep what they still need.
        rec.alive.clear()
        for tile in rec.tiles:
            tile.alive.clear()
        return y_th

    def _begin_tile(self, rec: LayerRecord, segment: str, start: int, end: int) -> None:
        """The next tile of a tiled layer starts: the one before it has packed all it saves, and the
        offloads of the one before that must be done (two tiles of copies in flight)."""
        k = len(rec.tiles)
        if k >= 1:
            rec.tiles[k - 1].alive.clear()  # its keys are its own: no later tile can alias them
        if k >= 2:
            self._wait_tile_copies(rec, rec.tiles[k - 2])
        rec.tiles.append(Tile(segment, start, end, head=end <= rec.a))
        rec.tile_current = k

    def layer_offload_bytes(
        self, parts: LayerParts, x_th: Tensor, ctx: LayerContext, alpha: float = 1.0
    ) -> tuple[int, int]:
        """(whole, rows): the bytes one tokenwise forward of ``parts`` on ``x_th`` at ``alpha`` sends
        to the first tier's store, split into whole tensors and the head rows of the row tensors.
        The forward's graph is dropped (a probe for ``profile.measure``)."""
        t = x_th.shape[0]
        with torch.enable_grad():
            self._forward_offloaded(parts, x_th, ctx, t, split_row(alpha, t), self.engine)
        self._wait_offloads(parts.index)
        rec = self.records.pop(parts.index)
        return rec.whole_bytes, rec.row_bytes

    def _add_whole(self, rec: LayerRecord, tensor: Tensor) -> int:
        idx = len(rec.wholes)
        key = (rec.index, "whole", idx)
        offset = cast(int, tensor.storage_offset())  # a SymInt only under symbolic tracing
        whole = Whole(key=key, base_offset=offset, numel=tensor.numel(), requires_grad=tensor.requires_grad)
        whole.copy = rec.engine.offload(key, tensor.detach(), rec.index)
        rec.whole_bytes += nbytes_of(tensor)
        rec.staged_bytes += nbytes_of(tensor)
        self._device_add(nbytes_of(tensor))
        rec.wholes.append(whole)
        if tensor.is_contiguous():  # its storage region is [offset, offset + numel): views map into it
            rec.whole_by_storage.setdefault(storage_key(tensor), idx)
        return idx

    def _pack(self, rec: LayerRecord, segment: str, tensor: Tensor, shared: set[int]) -> Handle:
        vkey = view_key(tensor)
        tiled = rec.tile_rows > 0 and segment != "attn"
        key = (rec.tile_current, vkey) if tiled else vkey  # a tile's tensors are its own
        slot = rec.slots.get(key)
        if slot is None:
            # detached: no path back into the graph (see _recompute_tails)
            (rec.tiles[rec.tile_current].alive if tiled else rec.alive).append(tensor.detach())
            slot = self._classify(rec, segment, vkey, tensor, shared)
            rec.slots[key] = slot
        slot.refs += 1
        rec.pending_refs += 1
        handle = Handle(key)
        rec.handles.add(handle)
        return handle

    def _classify(
        self, rec: LayerRecord, segment: str, vkey: tuple, tensor: Tensor, shared: set[int]
    ) -> Slot:
        if storage_key(tensor) in shared or is_param_like(tensor, rec.param_keys):
            return Slot("keep", tensor=tensor)
        if segment == "attn":  # classified once the core has returned out and lse
            rec.core_saves.append((vkey, tensor.detach()))
            return Slot("pending")
        view = self._view_slot(rec, tensor)
        if view is not None:
            return view
        if rec.tile_rows:
            return self._tile_slot(rec, tensor)
        if tensor.dim() >= 1 and tensor.shape[0] == rec.t:
            return self._row_slot(rec, segment, tensor)
        rec.resident_bytes += nbytes_of(tensor)
        self._device_add(nbytes_of(tensor))
        return Slot("keep", tensor=tensor.detach())  # detached: see _pack_kept

    def _classify_core_saves(self, rec: LayerRecord, qkv: dict[str, Tensor]) -> None:
        """What the attention core saved: q, k, v (the tensors the executor passed in) are row
        tensors rebuilt by the pre-attention rerun; views of out and lse map into their whole
        copies; anything else is offloaded whole (attention is never recomputed)."""
        names = {view_key(tensor): name for name, tensor in qkv.items()}
        for vkey, tensor in rec.core_saves:
            name = names.get(vkey)
            if name is not None and tensor.shape[0] == rec.t:
                slot = self._row_slot(rec, "attn", tensor)
                rec.qkv_rows[name] = slot.row
            else:
                view = self._view_slot(rec, tensor)
                slot = view if view is not None else Slot("whole", whole=self._add_whole(rec, tensor))
            slot.refs = rec.slots[vkey].refs
            rec.slots[vkey] = slot
        rec.core_saves.clear()

    def _view_slot(self, rec: LayerRecord, tensor: Tensor) -> Slot | None:
        """A view of a whole tensor's storage region, or None."""
        idx = rec.whole_by_storage.get(storage_key(tensor))
        if idx is None:
            return None
        offset = cast(int, tensor.storage_offset()) - rec.wholes[idx].base_offset
        last = offset + sum(
            (n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True) if n > 0
        )
        if offset < 0 or (tensor.numel() and last >= rec.wholes[idx].numel):
            return None  # shares the storage but reaches outside the whole tensor
        return Slot("view", whole=idx, size=tuple(tensor.shape), stride=tuple(tensor.stride()), offset=offset)

    def _row_slot(self, rec: LayerRecord, segment: str, tensor: Tensor) -> Slot:
        """A tensor of t token rows: its first a rows offloaded, the rest recomputed in backward."""
        row = len(rec.row_shapes)
        rec.row_shapes.append(tuple(tensor.shape))
        if segment != "attn":  # q, k, v rows are found by name (qkv_rows)
            rec.segments.setdefault(segment, []).append(row)
        head = tensor.detach()[: rec.a]
        rec.row_copies.append(
            rec.engine.offload((rec.index, "rows", row), head, rec.index) if rec.a else None
        )
        if rec.a:  # the original stays referenced until its head rows are copied
            rec.row_bytes += nbytes_of(head)
            rec.staged_bytes += nbytes_of(tensor)
            self._device_add(nbytes_of(tensor))
        return Slot("rows", row=row)

    def _tile_slot(self, rec: LayerRecord, tensor: Tensor) -> Slot:
        """A tensor the current tile saved: offloaded whole in a head tile, dropped in a tail tile."""
        k = rec.tile_current
        tile = rec.tiles[k]
        n = len(tile.shapes)
        tile.shapes.append(tuple(tensor.shape))
        if tile.head:
            tile.copies.append(rec.engine.offload((rec.index, "tile", k, n), tensor.detach(), rec.index))
            rec.row_bytes += nbytes_of(tensor)
            tile.staged_bytes += nbytes_of(tensor)
            self._device_add(nbytes_of(tensor))
        return Slot("tile", tile=k, row=n)

    def _wait_tile_copies(self, rec: LayerRecord, tile: Tile) -> None:
        for c in tile.copies:
            rec.engine.wait(c)
        tile.copies = []
        self._device_sub(tile.staged_bytes)
        tile.staged_bytes = 0

    def _wait_offloads(self, index: int) -> None:
        rec = self.records.get(index)
        if rec is None:
            return
        for c in [w.copy for w in rec.wholes] + rec.row_copies:
            if c is not None:
                rec.engine.wait(c)
        for w in rec.wholes:
            w.copy = None
        rec.row_copies = [None] * len(rec.row_copies)
        self._device_sub(rec.staged_bytes)
        rec.staged_bytes = 0
        for tile in rec.tiles:
            self._wait_tile_copies(rec, tile)

    # ---------------------------------------------------------------- backward
    def _prefetch(self, index: int) -> None:
        rec = self.records.get(index)
        if rec is None or rec.prefetched:
            return
        self._wait_offloads(index)
        rec.prefetched = True
        for w in rec.wholes:
            w.copy = rec.engine.fetch(w.key)
        rec.head_fetch = [
            rec.engine.fetch((index, "rows", r)) if rec.a else None for r in range(len(rec.row_shapes))
        ]

    def _prefetch_below(self, index: int) -> None:
        """Start fetching the next tokenwise layer below ``index`` (the next one backward reaches)."""
        below = [j for j in self.records if j < index]
        if below:
            self._prefetch(max(below))

    def _unpack(self, rec: LayerRecord, handle: Handle) -> Tensor:
        if not rec.rebuilt:
            self._prefetch_below(rec.index)  # the layer above has finished its backward
            self._rebuild(rec)
        slot = rec.slots[handle.vkey]
        if slot.kind == "keep":
            value = slot.tensor
        elif slot.kind == "whole":
            value = self._whole_value(rec, slot.whole)
        elif slot.kind == "view":
            base = self._whole_value(rec, slot.whole)
            # as_strided offsets count from the storage start; a fetched base may sit at an offset in its
            # storage (an aligned file-tier read)
            value = base.as_strided(slot.size, slot.stride, base.storage_offset() + slot.offset)
        elif slot.kind == "tile":
            value = self._tile_value(rec, slot)
        else:
            if not rec.rows_rebuilt:
                self._rebuild_rows(rec)
            value = rec.full_rows[slot.row]
        assert value is not None  # kept tensors are set by _classify, the others by the rebuilds
        slot.refs -= 1
        rec.pending_refs -= 1
        if slot.refs == 0 and slot.kind == "rows":
            self._device_sub(nbytes_of(value))
            rec.full_rows[slot.row] = None
        if slot.refs == 0 and slot.kind == "tile":
            self._device_sub(nbytes_of(value))
            rec.tiles[slot.tile].values[slot.row] = None
        if rec.pending_refs == 0:  # this layer's backward has unpacked everything: free it
            self._device_sub(rec.resident_bytes)
            rec.resident_bytes = 0
            for w in rec.wholes:
                w.value = None
            rec.slots.clear()
        return value

    def _rebuild(self, rec: LayerRecord) -> None:
        """The layer's backward begins: fetch the whole tensors (and start reading the first head
        tile backward needs)."""
        self.trim_heap()  # the layer above has finished its backward and freed its tensors
        self._prefetch(rec.index)
        # reruns save the parameters as they are now (under sharding: unsharded again for backward)
        rec.param_keys = parameter_storages(self._layers[rec.index].module)
        for w in rec.wholes:
            w.value = rec.engine.wait(w.copy)
            w.copy = None
            rec.resident_bytes += nbytes_of(w.value)
            self._device_add(nbytes_of(w.value))
        self._fetch_tile(rec, self._next_head_tile(rec, len(rec.tiles)))
        rec.rebuilt = True

    def _next_head_tile(self, rec: LayerRecord, k: int) -> int | None:
        """The head tile backward reaches after tile ``k`` (tiles run backward in reverse order)."""
        return next((j for j in reversed(range(k)) if rec.tiles[j].head), None)

    def _fetch_tile(self, rec: LayerRecord, k: int | None) -> None:
        if k is None or rec.tiles[k].fetched:
            return
        tile = rec.tiles[k]
        self._wait_tile_copies(rec, tile)
        tile.fetched = True
        tile.fetches = [rec.engine.fetch((rec.index, "tile", k, n)) for n in range(len(tile.shapes))]

    def _tile_value(self, rec: LayerRecord, slot: Slot) -> Tensor:
        """A tile's saved tensor; at the tile's first unpack all of them are read (head) or
        recomputed (tail), and the next head tile's read starts."""
        tile = rec.tiles[slot.tile]
        if not tile.ready:
            if tile.head:
                self._fetch_tile(rec, slot.tile)
                tile.values = [rec.engine.wait(c) for c in tile.fetches]
                tile.fetches = []
            else:
                tile.values = list(self._recompute_tile(rec, tile))
            for value in tile.values:
                assert value is not None
                self._device_add(nbytes_of(value))
            tile.ready = True
            self._fetch_tile(rec, self._next_head_tile(rec, slot.tile))
        value = tile.values[slot.row]
        assert value is not None  # released only after its last unpack
        return value

    def _rebuild_rows(self, rec: LayerRecord) -> None:
        """Reassemble every row slot: head rows read back, rows [a, t) recomputed."""
        heads = [rec.engine.wait(c) if c is not None else None for c in rec.head_fetch]
        rec.head_fetch = []
        tails = self._recompute_tails(rec)
        rec.full_rows = []
        for row, shape in enumerate(rec.row_shapes):
            parts = [p for p in (heads[row], tails[row]) if p is not None and p.shape[0] > 0]
            full = parts[0] if len(parts) == 1 else torch.cat(parts)
            if tuple(full.shape) != shape:
                raise RuntimeError(
                    f"token-wise rebuild of layer {rec.index} row slot {row} gave {tuple(full.shape)}, "
                    f"expected {shape}"
                )
            self._device_add(nbytes_of(full))
            rec.full_rows.append(full)
        rec.rows_rebuilt = True
        self._evict_input(rec)

    def _evict_input(self, rec: LayerRecord) -> None:
        """The rows are rebuilt: nothing but the pre-attention backward reads the layer input again,
        and between now and then runs the attention backward, the layer's peak (q, k, v, out, dout
        and the kernel's gradients live at once). Drop the input until then; ``_whole_value`` reads
        it back from the tier at its next use (one [t, hidden] read per layer)."""
        whole = rec.wholes[rec.x_whole]
        if whole.value is None or rec.pending_refs == 0:
            return
        if rec.engine.store.tier == "host" and rec.engine.device.type == "cpu":
            return  # read in place from the host tier: dropping the view would free nothing
        n = nbytes_of(whole.value)
        whole.value = None
        rec.resident_bytes -= n
        self._device_sub(n)

    def _whole_value(self, rec: LayerRecord, idx: int) -> Tensor:
        """A whole tensor's fetched value; an evicted one (the layer input) is read back now."""
        whole = rec.wholes[idx]
        if whole.value is None:
            whole.value = rec.engine.wait(rec.engine.fetch(whole.key))
            assert whole.value is not None
            rec.x_rereads += 1
            rec.resident_bytes += nbytes_of(whole.value)
            self._device_add(nbytes_of(whole.value))
        return whole.value

    def _capture(
        self,
        rec: LayerRecord,
        shared: set[int],
        captured: list[Tensor],
        alive: list[Tensor],
        rows: int | None,
    ):
        """A pack hook for a rerun: appends to ``captured`` what the forward classified as its own
        (not a parameter, not in a ``shared`` storage, each tensor once; with ``rows``: only tensors
        of that many rows) and packs nothing (the rerun's graph is dropped)."""
        seen: set[tuple] = set()

        def hook(tensor: Tensor) -> None:
            vkey = view_key(tensor)
            if vkey in seen or storage_key(tensor) in shared or is_param_like(tensor, rec.param_keys):
                return None
            seen.add(vkey)
            # Detached: autograd keeps this hook (and so ``alive``) referenced from the graph's saved
            # variables; a grad_fn here would close a cycle through C++ that the garbage collector
            # cannot see, leaking the rerun graph every step. ``alive``: as in forward, no freed-and-
            # reused memory may alias a seen tensor.
            alive.append(tensor.detach())
            if rows is None or (tensor.dim() >= 1 and tensor.shape[0] == rows):
                captured.append(tensor.detach())
            return None

        return hook

    def _rerun_inputs(self, rec: LayerRecord, start: int) -> tuple[Tensor, Tensor, set[int]]:
        """Rows [start, t) of the layer input and the attention output as a rerun's inputs, and the
        storages a rerun's capture skips (theirs and the RoPE tables')."""
        ctx = self._ctx
        x_whole, out_whole = self._whole_value(rec, rec.x_whole), self._whole_value(rec, rec.out_whole)
        assert ctx is not None  # set by __call__
        shared = {storage_key(t) for t in (ctx.cos_td, ctx.sin_td, x_whole, out_whole)}
        x_in = x_whole[start:].detach().requires_grad_(rec.wholes[rec.x_whole].requires_grad)
        o_in = out_whole[start:].detach().requires_grad_(rec.wholes[rec.out_whole].requires_grad)
        return x_in, o_in, shared

    def _autocast(self, rec: LayerRecord) -> contextlib.AbstractContextManager:
        enabled, dtype, dev = rec.autocast
        return torch.autocast(dev, dtype=dtype) if enabled else contextlib.nullcontext()

    def _recompute_tile(self, rec: LayerRecord, tile: Tile) -> list[Tensor]:
        """A tail tile's saved tensors: its part re-run on its rows, capturing what it saves."""
        parts, ctx = self._layers[rec.index], self._ctx
        assert ctx is not None
        s, e = tile.start, tile.end
        captured: list[Tensor] = []
        alive: list[Tensor] = []
        with torch.enable_grad(), self._autocast(rec):
            x_all, o_all, shared = self._rerun_inputs(rec, 0)
            x_in, o_in = x_all[s:e], o_all[s:e]
            with torch.autograd.graph.saved_tensors_hooks(
                self._capture(rec, shared, captured, alive, None), lambda p: p
            ):
                if tile.segment == "pre":
                    parts.pre_attention(x_in, ctx.cos_td[s:e], ctx.sin_td[s:e])
                else:
                    parts.post_attention(x_in, o_in)
        shapes = [tuple(c.shape) for c in captured]
        if shapes != tile.shapes:
            raise RuntimeError(
                f"token-wise recompute of layer {rec.index} {tile.segment} tile [{s}, {e}) saved tensors of "
                f"shapes {shapes}, forward saved {tile.shapes}; this layer is not row-wise as the adapter promises"
            )
        return captured

    def _recompute_tails(self, rec: LayerRecord) -> list[Tensor | None]:
        n_rows = len(rec.row_shapes)
        if rec.a >= rec.t:
            return [None] * n_rows
        parts, ctx = self._layers[rec.index], self._ctx
        assert ctx is not None
        cos, sin = ctx.cos_td[rec.a :], ctx.sin_td[rec.a :]
        captured: dict[str, list[Tensor]] = {"pre": [], "post": []}
        alive: list[Tensor] = []
        tails: list[Tensor | None] = [None] * n_rows
        if rec.tile_rows:  # q, k, v are the only row slots; the tiles rebuild their own tensors
            bounds = [
                (s - rec.a, e - rec.a) for s, e in tile_bounds(rec.t, rec.tile_rows, rec.a) if s >= rec.a
            ]
            x_in, _o, _shared = self._rerun_inputs(rec, rec.a)
            with torch.no_grad(), self._autocast(rec):
                q, k, v = tiled_pre_attention(parts, x_in, cos, sin, bounds)
        else:
            with torch.enable_grad(), self._autocast(rec):
                x_in, o_in, shared = self._rerun_inputs(rec, rec.a)
                t_tail = rec.t - rec.a
                with torch.autograd.graph.saved_tensors_hooks(
                    self._capture(rec, shared, captured["pre"], alive, t_tail), lambda p: p
                ):
                    q, k, v = parts.pre_attention(x_in, cos, sin)
                with torch.autograd.graph.saved_tensors_hooks(
                    self._capture(rec, shared, captured["post"], alive, t_tail), lambda p: p
                ):
                    parts.post_attention(x_in, o_in)
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if name in rec.qkv_rows:
                tails[rec.qkv_rows[name]] = tensor.detach()
        for segment, recomputed in (("pre", captured["pre"]), ("post", captured["post"])):
            rows = rec.segments.get(segment, [])
            if len(rows) != len(recomputed):
                raise RuntimeError(
                    f"token-wise recompute of layer {rec.index} ({segment}) saved {len(recomputed)} row tensors, "
                    f"forward saved {len(rows)}; this layer is not row-wise as the adapter promises"
                )
            for row, tensor in zip(rows, recomputed, strict=True):
                tails[row] = tensor
        return tails

    def _release_step(self) -> None:
        """Drop the previous step's records (its backward has finished) and reset the accounting."""
        for rec in self.records.values():
            if len(rec.handles) and rec.pending_refs:
                raise RuntimeError(
                    "token-wise activation memory holds one pending backward at a time: call backward() on the "
                    "previous forward's loss (or drop it) before the next forward, or use activation.mode=recompute"
                )
        for index in list(self.records):
            self._wait_offloads(index)
        self.records.clear()
        for engine in self.engines.values():
            engine.store.release_all()
            engine.timer.reset()
        self._step += 1
        self.trim_heap.reset()
        self._device_bytes = 0
        self._device_peak = 0
        self._kept_refs = {}

    def close(self) -> None:
        """Finish pending copies, stop the copy threads, delete the file tier's file."""
        for index in list(self.records):
            self._wait_offloads(index)
        self._stats = {
            **self._stats,
            **{k: v for k, v in self.stats().items() if k.endswith("_input_rereads")},
        }
        self.records.clear()
        for engine in self.engines.values():
            engine.close()
            engine.store.close()

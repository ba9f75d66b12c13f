"""Token-wise activation swap/recompute (MEMO) as a layer executor.

For every offloaded layer (all but the last ``keep_last``), autograd runs as usual but each tensor
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

Schedule: offloads of layer i run on the d2h queue while later layers compute; layer i+2 waits
for layer i's copies (two buffers in flight). In backward, layer i is prefetched when layer i+1's
backward starts (i.e. when layer i+2's backward has ended).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer

from .copy_engine import Copy
from .cost import split_row
from .heap import HeapTrimmer

if TYPE_CHECKING:
    from .profile import LayerProfile


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def parameter_storages(model: torch.nn.Module) -> set[int]:
    """Storage keys of ``model``'s parameters: a saved tensor in one of them is never an activation."""
    return {_storage_key(p) for p in model.parameters()}


def _view_key(t: Tensor) -> tuple:
    return (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _is_param_like(t: Tensor, param_storages: set[int]) -> bool:
    """A parameter, or an autocast cast of one (ToCopyBackward straight from an AccumulateGrad), or a
    view of such a cast (under autocast ``linear`` saves ``weight_cast.t()``, a TBackward0 view)."""
    if _storage_key(t) in param_storages:
        return True
    fn = (t._base if t._base is not None else t).grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0":
        nxt = fn.next_functions
        if len(nxt) == 1 and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad":
            # .variable: the AccumulateGrad node's parameter (torch's Node stub does not declare it)
            return _storage_key(cast(Any, nxt[0][0]).variable) in param_storages
    return False


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _Handle:
    """What autograd holds instead of a saved tensor; weakly tracked to detect pending graphs."""

    __slots__ = ("vkey", "__weakref__")

    def __init__(self, vkey: tuple):
        self.vkey = vkey


@dataclass
class _Slot:
    """One saved tensor of an offloaded layer."""

    kind: str  # "keep" | "view" | "whole" | "rows" | "pending" (saved by the core, classified after it)
    tensor: Tensor | None = None  # keep: the tensor itself
    whole: int = -1  # view, whole: index of the whole tensor
    size: tuple = ()
    stride: tuple = ()
    offset: int = 0
    row: int = -1  # rows: index among the layer's row slots
    refs: int = 0  # unpacks still to come


@dataclass
class _Whole:
    key: tuple
    base_offset: int
    numel: int
    requires_grad: bool  # as in forward: the rerun must save what the forward saved (frozen embeddings)
    copy: Copy | None = None
    value: Tensor | None = None


@dataclass
class _LayerRecord:
    index: int
    t: int
    a: int
    autocast: tuple
    wholes: list[_Whole] = field(default_factory=list)
    whole_by_storage: dict[int, int] = field(default_factory=dict)
    slots: dict[tuple, _Slot] = field(default_factory=dict)
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
    pending_refs: int = 0
    handles: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    prefetched: bool = False
    rebuilt: bool = False


class TokenwiseExecutor:
    """Runs the decoder layers with token-wise swap/recompute (see the module docstring)."""

    def __init__(
        self,
        engine,
        alpha: float | str,
        keep_last: int,
        param_storages: set[int],
        trim_heap: HeapTrimmer | None = None,
    ):
        self.engine = engine
        self.trim_heap = trim_heap or HeapTrimmer(False)
        self.alpha = alpha  # "auto" until alpha_resolver measured it on the first step
        # alpha="auto": measures the layer and the link at a new length -> (alpha, the measurement)
        self.alpha_resolver: (
            Callable[[list[LayerParts], Tensor, LayerContext], tuple[float, LayerProfile | None]] | None
        ) = None
        self.profile: LayerProfile | None = None  # what alpha_resolver last measured
        self.keep_last = keep_last
        self.param_storages = param_storages
        self.records: dict[int, _LayerRecord] = {}
        self._layers: list[LayerParts] = []
        self._ctx: LayerContext | None = None
        self._stats: dict[str, Any] = {}
        self._device_bytes = 0
        self._device_peak = 0
        self._store_bytes = 0  # bytes submitted to the store this step (its size once the copies land)
        self._kept_refs: dict[int, int] = {}  # kept layers: saved storage -> packs not yet unpacked
        self._kept_shared: set[int] = set()  # RoPE tables of this step (shared by all layers)
        self._alpha_t = -1

    # ---------------------------------------------------------------- accounting
    def _device_add(self, n: int) -> None:
        self._device_bytes += n
        self._device_peak = max(self._device_peak, self._device_bytes)

    def _device_sub(self, n: int) -> None:
        self._device_bytes -= n

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (logged to metrics.jsonl by the trainer)."""
        timer = self.engine.timer
        exposed = min(timer.exposed_s, timer.copy_s)
        return {
            **self._stats,
            "host_bytes": self._stats.get("host_bytes", 0),
            "file_bytes": self._stats.get("file_bytes", 0),
            "device_peak_bytes": self._device_peak,
            "copy_s": timer.copy_s,
            "copy_exposed_s": timer.exposed_s,
            "copy_hidden_s": timer.copy_s - exposed,
            "heap_trims": self.trim_heap.calls,
            "heap_trim_s": self.trim_heap.seconds,
        }

    # ---------------------------------------------------------------- forward
    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        if not torch.is_grad_enabled():  # nothing is saved for backward: run plainly
            for parts in layers:
                x_th = run_layer(parts, x_th, ctx)
            return x_th
        self._release_step()
        self._layers, self._ctx = layers, ctx
        n_offloaded = max(0, len(layers) - self.keep_last)
        t = x_th.shape[0]
        if self.alpha_resolver is not None and (self.alpha == "auto" or self._alpha_t != t):
            (self.alpha, self.profile), self._alpha_t = self.alpha_resolver(layers, x_th, ctx), t
        a = split_row(cast(float, self.alpha), t)  # "auto" was resolved just above
        self._kept_shared = {_storage_key(ctx.cos_td), _storage_key(ctx.sin_td)}
        for parts in layers:
            if parts.index < n_offloaded:
                self._wait_offloads(parts.index - 2)  # layer i reuses layer i-2's buffer
                if parts.index >= 2:
                    self.trim_heap()  # layer i-2's saved tensors are free now
                x_th = self._forward_offloaded(parts, x_th, ctx, t, a)
            else:
                with torch.autograd.graph.saved_tensors_hooks(self._pack_kept, self._unpack_kept):
                    x_th = run_layer(parts, x_th, ctx)
        # Counted at submission: the copy threads may still be filling the store here, so reading
        # store.nbytes() would race with the last offloaded layers' copies.
        store_bytes = self._store_bytes
        tier_key = "file_bytes" if self.engine.store.tier == "file" else "host_bytes"
        self._stats = {
            "host_bytes": 0,
            "file_bytes": 0,
            tier_key: store_bytes,
            "offloaded_layers": n_offloaded,
            "offload_rows_per_layer": a,
            "recomputed_rows": (t - a) * n_offloaded,
            "alpha": self.alpha,
        }
        if n_offloaded:  # the last offloaded layer's backward follows the kept layers'
            self._prefetch(n_offloaded - 1)
        return x_th

    def _pack_kept(self, tensor: Tensor) -> tuple[Tensor, int | None]:
        """Kept layers: count each saved storage once (a tensor saved by several ops, e.g. the norm
        output read by q, k and v, is held once); parameters and the RoPE tables are resident anyway."""
        key = _storage_key(tensor)
        if key in self._kept_shared or _is_param_like(tensor, self.param_storages):
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
        self, parts: LayerParts, x_th: Tensor, ctx: LayerContext, t: int, a: int
    ) -> Tensor:
        dev = x_th.device.type
        rec = _LayerRecord(
            parts.index, t, a, (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
        )
        self.records[parts.index] = rec
        shared = {_storage_key(ctx.cos_td), _storage_key(ctx.sin_td)}
        rec.x_whole = self._add_whole(rec, x_th)

        def pack(segment: str):
            def hook(tensor: Tensor):
                return self._pack(rec, segment, tensor, shared)

            return hook

        unpack = lambda key: self._unpack(rec, key)  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack("pre"), unpack):
            q, k, v = parts.pre_attention(x_th, ctx.cos_td, ctx.sin_td)
        with torch.autograd.graph.saved_tensors_hooks(pack("attn"), unpack):
            out_tnd, lse = ctx.attention(parts, q, k, v)
        rec.out_whole = self._add_whole(rec, out_tnd)
        self._add_whole(rec, lse)
        self._classify_core_saves(rec, {"q": q, "k": k, "v": v})
        with torch.autograd.graph.saved_tensors_hooks(pack("post"), unpack):
            y_th = parts.post_attention(x_th, out_tnd)
        # Packed tensors were held so that a freed tensor's memory, reused by a later tensor of the same
        # shape, can never alias an earlier slot; the copies in flight keep what they still need.
        rec.alive.clear()
        return y_th

    def layer_offload_bytes(self, parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> tuple[int, int]:
        """(whole, rows): the bytes one offloaded forward of ``parts`` on ``x_th`` sends to the store
        at this executor's alpha, split into whole tensors and the head rows of the row tensors.
        The forward's graph is dropped (a probe for ``profile.measure``)."""
        t = x_th.shape[0]
        with torch.enable_grad():
            self._forward_offloaded(parts, x_th, ctx, t, split_row(float(self.alpha), t))
        self._wait_offloads(parts.index)
        rec = self.records.pop(parts.index)
        return rec.whole_bytes, rec.row_bytes

    def _add_whole(self, rec: _LayerRecord, tensor: Tensor) -> int:
        idx = len(rec.wholes)
        key = (rec.index, "whole", idx)
        offset = cast(int, tensor.storage_offset())  # a SymInt only under symbolic tracing
        whole = _Whole(key=key, base_offset=offset, numel=tensor.numel(), requires_grad=tensor.requires_grad)
        whole.copy = self.engine.offload(key, tensor.detach(), rec.index)
        self._store_bytes += _nbytes(tensor)
        rec.whole_bytes += _nbytes(tensor)
        rec.staged_bytes += _nbytes(tensor)
        self._device_add(_nbytes(tensor))
        rec.wholes.append(whole)
        if tensor.is_contiguous():  # its storage region is [offset, offset + numel): views map into it
            rec.whole_by_storage.setdefault(_storage_key(tensor), idx)
        return idx

    def _pack(self, rec: _LayerRecord, segment: str, tensor: Tensor, shared: set[int]) -> _Handle:
        vkey = _view_key(tensor)
        slot = rec.slots.get(vkey)
        if slot is None:
            rec.alive.append(tensor.detach())  # detached: no path back into the graph (see _recompute_tails)
            slot = self._classify(rec, segment, vkey, tensor, shared)
            rec.slots[vkey] = slot
        slot.refs += 1
        rec.pending_refs += 1
        handle = _Handle(vkey)
        rec.handles.add(handle)
        return handle

    def _classify(
        self, rec: _LayerRecord, segment: str, vkey: tuple, tensor: Tensor, shared: set[int]
    ) -> _Slot:
        if _storage_key(tensor) in shared or _is_param_like(tensor, self.param_storages):
            return _Slot("keep", tensor=tensor)
        if segment == "attn":  # classified once the core has returned out and lse
            rec.core_saves.append((vkey, tensor.detach()))
            return _Slot("pending")
        view = self._view_slot(rec, tensor)
        if view is not None:
            return view
        if tensor.dim() >= 1 and tensor.shape[0] == rec.t:
            return self._row_slot(rec, segment, tensor)
        rec.resident_bytes += _nbytes(tensor)
        self._device_add(_nbytes(tensor))
        return _Slot("keep", tensor=tensor.detach())  # detached: see _pack_kept

    def _classify_core_saves(self, rec: _LayerRecord, qkv: dict[str, Tensor]) -> None:
        """What the attention core saved: q, k, v (the tensors the executor passed in) are row
        tensors rebuilt by the pre-attention rerun; views of out and lse map into their whole
        copies; anything else is offloaded whole (attention is never recomputed)."""
        names = {_view_key(tensor): name for name, tensor in qkv.items()}
        for vkey, tensor in rec.core_saves:
            name = names.get(vkey)
            if name is not None and tensor.shape[0] == rec.t:
                slot = self._row_slot(rec, "attn", tensor)
                rec.qkv_rows[name] = slot.row
            else:
                view = self._view_slot(rec, tensor)
                slot = view if view is not None else _Slot("whole", whole=self._add_whole(rec, tensor))
            slot.refs = rec.slots[vkey].refs
            rec.slots[vkey] = slot
        rec.core_saves.clear()

    def _view_slot(self, rec: _LayerRecord, tensor: Tensor) -> _Slot | None:
        """A view of a whole tensor's storage region, or None."""
        idx = rec.whole_by_storage.get(_storage_key(tensor))
        if idx is None:
            return None
        offset = cast(int, tensor.storage_offset()) - rec.wholes[idx].base_offset
        last = offset + sum(
            (n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True) if n > 0
        )
        if offset < 0 or (tensor.numel() and last >= rec.wholes[idx].numel):
            return None  # shares the storage but reaches outside the whole tensor
        return _Slot(
            "view", whole=idx, size=tuple(tensor.shape), stride=tuple(tensor.stride()), offset=offset
        )

    def _row_slot(self, rec: _LayerRecord, segment: str, tensor: Tensor) -> _Slot:
        """A tensor of t token rows: its first a rows offloaded, the rest recomputed in backward."""
        row = len(rec.row_shapes)
        rec.row_shapes.append(tuple(tensor.shape))
        if segment != "attn":  # q, k, v rows are found by name (qkv_rows)
            rec.segments.setdefault(segment, []).append(row)
        head = tensor.detach()[: rec.a]
        rec.row_copies.append(
            self.engine.offload((rec.index, "rows", row), head, rec.index) if rec.a else None
        )
        if rec.a:  # the original stays referenced until its head rows are copied
            self._store_bytes += _nbytes(head)
            rec.row_bytes += _nbytes(head)
            rec.staged_bytes += _nbytes(tensor)
            self._device_add(_nbytes(tensor))
        return _Slot("rows", row=row)

    def _wait_offloads(self, index: int) -> None:
        rec = self.records.get(index)
        if rec is None:
            return
        for c in [w.copy for w in rec.wholes] + rec.row_copies:
            if c is not None:
                self.engine.wait(c)
        for w in rec.wholes:
            w.copy = None
        rec.row_copies = [None] * len(rec.row_copies)
        self._device_sub(rec.staged_bytes)
        rec.staged_bytes = 0

    # ---------------------------------------------------------------- backward
    def _prefetch(self, index: int) -> None:
        rec = self.records.get(index)
        if rec is None or rec.prefetched:
            return
        self._wait_offloads(index)
        rec.prefetched = True
        for w in rec.wholes:
            w.copy = self.engine.fetch(w.key)
        rec.head_fetch = [
            self.engine.fetch((index, "rows", r)) if rec.a else None for r in range(len(rec.row_shapes))
        ]

    def _unpack(self, rec: _LayerRecord, handle: _Handle) -> Tensor:
        vkey = handle.vkey
        if not rec.rebuilt:
            self._prefetch(rec.index - 1)  # layer i+1's backward has ended: start fetching layer i-1
            self._rebuild(rec)
        slot = rec.slots[vkey]
        if slot.kind == "keep":
            value = slot.tensor
        elif slot.kind == "whole":
            value = rec.wholes[slot.whole].value
        elif slot.kind == "view":
            base = rec.wholes[slot.whole].value
            assert base is not None  # fetched by _rebuild
            # as_strided offsets count from the storage start; a fetched base may sit at an offset in its
            # storage (an aligned file-tier read)
            value = base.as_strided(slot.size, slot.stride, base.storage_offset() + slot.offset)
        else:
            value = rec.full_rows[slot.row]
        assert value is not None  # kept tensors are set by _classify, wholes and rows by _rebuild
        slot.refs -= 1
        rec.pending_refs -= 1
        if slot.refs == 0 and slot.kind == "rows":
            self._device_sub(_nbytes(value))
            rec.full_rows[slot.row] = None
        if rec.pending_refs == 0:  # this layer's backward has unpacked everything: free it
            self._device_sub(rec.resident_bytes)
            rec.resident_bytes = 0
            for w in rec.wholes:
                w.value = None
            rec.slots.clear()
        return value

    def _rebuild(self, rec: _LayerRecord) -> None:
        """Fetch the offloaded rows and whole tensors; recompute rows [a, t) of every row slot."""
        self.trim_heap()  # the layer above has finished its backward and freed its tensors
        self._prefetch(rec.index)
        for w in rec.wholes:
            w.value = self.engine.wait(w.copy)
            w.copy = None
            rec.resident_bytes += _nbytes(w.value)
            self._device_add(_nbytes(w.value))
        heads = [self.engine.wait(c) if c is not None else None for c in rec.head_fetch]
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
            self._device_add(_nbytes(full))
            rec.full_rows.append(full)
        rec.rebuilt = True

    def _recompute_tails(self, rec: _LayerRecord) -> list[Tensor | None]:
        n_rows = len(rec.row_shapes)
        if rec.a >= rec.t:
            return [None] * n_rows
        parts, ctx = self._layers[rec.index], self._ctx
        x_whole, out_whole = rec.wholes[rec.x_whole].value, rec.wholes[rec.out_whole].value
        assert ctx is not None and x_whole is not None and out_whole is not None  # set by __call__, _rebuild
        x_tail = x_whole[rec.a :]
        out_tail = out_whole[rec.a :]
        cos, sin = ctx.cos_td[rec.a :], ctx.sin_td[rec.a :]
        captured: dict[str, list[Tensor]] = {"pre": [], "post": []}
        alive: list[Tensor] = []  # as in forward: no freed-and-reused memory may alias a seen tensor
        shared = {
            _storage_key(ctx.cos_td),
            _storage_key(ctx.sin_td),
            _storage_key(x_tail),
            _storage_key(out_tail),
        }

        def capture(segment: str):
            seen: set[tuple] = set()

            def hook(tensor: Tensor):
                vkey = _view_key(tensor)
                if (
                    vkey in seen
                    or _storage_key(tensor) in shared
                    or _is_param_like(tensor, self.param_storages)
                ):
                    return None
                seen.add(vkey)
                # Detached: autograd keeps this hook (and so ``alive``) referenced from the graph's
                # saved variables; a grad_fn here would close a cycle through C++ that the garbage
                # collector cannot see, leaking the rerun graph every step.
                alive.append(tensor.detach())
                if tensor.dim() >= 1 and tensor.shape[0] == rec.t - rec.a:
                    captured[segment].append(tensor.detach())
                return None

            return hook

        enabled, dtype, dev = rec.autocast
        autocast = torch.autocast(dev, dtype=dtype) if enabled else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            x_in = x_tail.detach().requires_grad_(rec.wholes[rec.x_whole].requires_grad)
            o_in = out_tail.detach().requires_grad_(rec.wholes[rec.out_whole].requires_grad)
            with torch.autograd.graph.saved_tensors_hooks(capture("pre"), lambda p: p):
                q, k, v = parts.pre_attention(x_in, cos, sin)
            with torch.autograd.graph.saved_tensors_hooks(capture("post"), lambda p: p):
                parts.post_attention(x_in, o_in)
        tails: list[Tensor | None] = [None] * n_rows
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
        self.engine.store.release_all()
        self.engine.timer.reset()
        self.trim_heap.reset()
        self._device_bytes = 0
        self._device_peak = 0
        self._store_bytes = 0
        self._kept_refs = {}

    def close(self) -> None:
        """Finish pending copies, stop the copy threads, delete the file tier's file."""
        for index in list(self.records):
            self._wait_offloads(index)
        self.records.clear()
        self.engine.close()
        self.engine.store.close()

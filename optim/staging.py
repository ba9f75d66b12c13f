"""DRAM staging of the staged tiers (cxl, nvme): a fixed set of slots, loads in arrival order.

    staging.start()              queue the loads of every staged sub-group, in arrival order
    slot = staging.acquire(g)    wait for g's load (the update thread)
    staging.release(g, dirty)    store g back (a writer thread), then its slot is free again
    staging.finish()             wait for the stores; the next step starts again with start()

One reader thread loads sub-groups one after another into free slots, so with two slots the next
sub-group is read while the current one is updated and the previous one written. A load waits for
a free slot, so loads never run more than the number of slots ahead of the updates. The updates
must acquire the sub-groups in the order of ``start``'s loads (the container updates in arrival
order), else a load could wait for a slot that only a later update frees.

The slots are allocated once by the caller (``direct_io.aligned_buffer``, pinned on CUDA): no
step allocates host memory.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from torch import Tensor

from .tiers import StagedTier


class Staging:
    def __init__(self, tiers: Mapping[int, StagedTier], order: Sequence[int], slots: Sequence[Tensor]):
        """``tiers``: the tier of each staged sub-group; ``order``: the order the updates acquire them."""
        self._tiers = dict(tiers)
        self._order = [g for g in order if g in self._tiers]
        self._slots = list(slots)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._slots)):
            self._free.put(i)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="optim-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="optim-write")
        self._loads: dict[int, Future[int]] = {}
        self._stores: list[Future[None]] = []

    @property
    def started(self) -> bool:
        return bool(self._loads)

    def start(self) -> None:
        """Queue this step's loads (no-op if they are queued already)."""
        if not self._loads:
            self._loads = {g: self._reader.submit(self._load, g) for g in self._order}

    def _load(self, g: int) -> int:
        i = self._free.get()
        try:
            self._tiers[g].load(g, self._slots[i])
        except BaseException:
            self._free.put(i)
            raise
        return i

    def _store(self, g: int, i: int) -> None:
        try:
            self._tiers[g].store(g, self._slots[i])
        finally:
            self._free.put(i)

    def acquire(self, g: int) -> Tensor:
        """Sub-group ``g``'s state in a slot (waits for its load)."""
        self.start()
        return self._slots[self._loads[g].result()]

    def release(self, g: int, dirty: bool) -> None:
        """Done with ``g``: store it back if ``dirty``; the slot is free once that is done."""
        i = self._loads.pop(g).result()
        if dirty:
            self._stores.append(self._writer.submit(self._store, g, i))
        else:
            self._free.put(i)

    def finish(self) -> None:
        """Wait for every store; loads nobody acquired (a failed step) give their slots back."""
        for g in list(self._loads):
            try:
                self._free.put(self._loads.pop(g).result())
            except Exception:  # the load's own error was raised to whoever acquired it, or is moot now
                pass
        stores, self._stores = self._stores, []
        for f in stores:
            f.result()

    def load_now(self, g: int) -> Tensor:
        """``g`` in a slot now, outside a step (checkpointing); ``release`` it after."""
        assert g not in self._loads, "load_now during a step"
        self._loads[g] = self._reader.submit(self._load, g)
        return self.acquire(g)

    def close(self) -> None:
        self.finish()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        self._slots.clear()

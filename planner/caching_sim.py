"""What PyTorch's CUDA caching allocator would reserve for a trace: ``simulate(items) -> CachingPeak``.

The peer of the arena in the benchmark: the planned peak is compared with the memory this allocator
reserves from the device (``torch.cuda.max_memory_reserved``) for the same allocation sequence.
The rules, from PyTorch's CUDA memory-management notes and the constants documented in its caching
allocator (c10/cuda/CUDACachingAllocator.cpp), with defaults (no ``max_split_size_mb``, no
expandable segments, one stream, nothing ever released back to the device):

* a request is rounded up to a multiple of 512 bytes (and at least 512);
* requests up to 1 MiB are served from the small pool, whose segments are 2 MiB; larger ones from
  the large pool, whose new segments are 20 MiB for requests under 10 MiB, else the request rounded
  up to 2 MiB;
* a request takes the smallest free cached block of its pool that holds it (best fit; lowest
  address among equal sizes); only when none does is a new segment reserved;
* the block is split when what is left over could serve another request of its pool: at least
  512 bytes in the small pool, more than 1 MiB in the large pool (otherwise the whole block is
  handed out, and its slack is lost until it is freed);
* a freed block merges with free neighbours of the same segment.

The simulation is written from those rules, not from the allocator's code; it does not model
garbage-collection thresholds or the retry that frees cached segments on an out-of-memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import Item

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # largest small-pool request
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20  # segment for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_request(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(request: int) -> int:
    if request <= SMALL_SIZE:
        return SMALL_SEGMENT
    if request < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-request // ROUND_LARGE) * ROUND_LARGE


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool
    prev: _Block | None = None
    next: _Block | None = None


@dataclass(frozen=True)
class CachingPeak:
    reserved: int  # peak bytes of all segments (what the device gives the allocator)
    allocated: int  # peak bytes of blocks handed out (requests rounded, unsplit slack included)
    requested: int  # peak bytes the trace asked for (its max-live)


class CachingAllocatorSim:
    def __init__(self) -> None:
        # Per pool, the free blocks sorted by (size, segment, offset): best fit is a bisect.
        self._free: dict[bool, list[tuple[int, int, int, int]]] = {True: [], False: []}
        self._blocks: dict[tuple[int, int], _Block] = {}  # (segment, offset) -> free block
        self._segments = 0
        self.reserved = self.allocated = self.requested = 0
        self.peak = CachingPeak(0, 0, 0)

    def _add_free(self, small: bool, b: _Block) -> None:
        b.free = True
        bisect.insort(self._free[small], (b.size, b.segment, b.offset, id(b)))
        self._blocks[b.segment, b.offset] = b

    def _take_free(self, small: bool, b: _Block) -> None:
        self._free[small].remove((b.size, b.segment, b.offset, id(b)))
        del self._blocks[b.segment, b.offset]
        b.free = False

    def malloc(self, size: int) -> tuple[_Block, bool]:
        request = round_request(size)
        small = request <= SMALL_SIZE
        pool = self._free[small]
        k = bisect.bisect_left(pool, (request, -1, -1, -1))
        if k < len(pool):
            block = self._blocks[pool[k][1], pool[k][2]]
            self._take_free(small, block)
        else:
            block = _Block(self._segments, 0, segment_size(request), False)
            self._segments += 1
            self.reserved += block.size
        rest = block.size - request
        if (small and rest >= MIN_BLOCK) or (not small and rest > SMALL_SIZE):
            tail = _Block(block.segment, block.offset + request, rest, True, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, request
            self._add_free(small, tail)
        self.allocated += block.size
        self.requested += size
        self.peak = CachingPeak(
            max(self.peak.reserved, self.reserved),
            max(self.peak.allocated, self.allocated),
            max(self.peak.requested, self.requested),
        )
        return block, small

    def free(self, block: _Block, small: bool, size: int) -> None:
        self.allocated -= block.size
        self.requested -= size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._take_free(small, neighbour)
                if neighbour is block.prev:  # absorb block into prev
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:  # absorb next into block
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._add_free(small, block)


def simulate(items: Sequence[Item]) -> CachingPeak:
    """Replay ``items`` (allocations and frees in event order; at one position, frees first) through
    the simulated allocator, starting empty."""
    events = sorted(
        [(it.start, 1, i) for i, it in enumerate(items)] + [(it.end, 0, i) for i, it in enumerate(items)]
    )
    sim = CachingAllocatorSim()
    held: dict[int, tuple[_Block, bool]] = {}
    for _, is_alloc, i in events:
        if is_alloc:
            held[i] = sim.malloc(items[i].size)
        else:
            sim.free(*held.pop(i), items[i].size)
    return sim.peak

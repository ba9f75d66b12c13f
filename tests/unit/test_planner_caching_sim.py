"""The caching-allocator simulation (planner/caching_sim.py) on hand-worked sequences: each case's
expected bytes follow from the rules in the module docstring, worked out here by hand."""

from __future__ import annotations

from longtrain.planner.caching_sim import CachingPeak, simulate
from longtrain.planner.layout import Item

MiB = 1 << 20


def test_small_requests_round_to_512_and_share_a_2_mib_segment():
    # 100 B -> 512; 1000 B -> 1024; both in the first small segment.
    assert simulate([Item(100, 0, 2), Item(1000, 1, 3)]) == CachingPeak(2 * MiB, 1536, 1100)
    # Four 1 MiB requests: two per 2 MiB segment (the split leaves exactly 1 MiB, >= 512).
    four = [Item(MiB, i, 10) for i in range(4)]
    assert simulate(four) == CachingPeak(4 * MiB, 4 * MiB, 4 * MiB)


def test_large_segments_20_mib_under_10_mib_else_rounded_to_2_mib():
    assert simulate([Item(MiB + 1, 0, 1)]).reserved == 20 * MiB
    assert simulate([Item(11 * MiB, 0, 1)]).reserved == 12 * MiB
    assert simulate([Item(12 * MiB, 0, 1)]).reserved == 12 * MiB


def test_best_fit_and_no_split_of_a_1_mib_rest():
    # A, B: 6 MiB each in one 20 MiB segment (A at 0, B at 6, 8 MiB free). A freed: free blocks of
    # 6 and 8 MiB. C (7 MiB) takes the 8 MiB block whole (a 1 MiB rest is not split off): 6 + 8
    # allocated. D (6 MiB) takes A's block exactly. E (2 MiB) finds nothing: a second segment.
    a, b = Item(6 * MiB, 0, 2), Item(6 * MiB, 1, 10)
    items = [a, b, Item(7 * MiB, 3, 10), Item(6 * MiB, 4, 10), Item(2 * MiB, 5, 10)]
    peak = simulate(items)
    assert peak.reserved == 40 * MiB
    assert peak.allocated == 6 * MiB + 8 * MiB + 6 * MiB + 2 * MiB
    assert peak.requested == 21 * MiB


def test_freed_neighbours_merge():
    # A, B (6 MiB each) freed: with merging the segment is one free 20 MiB block, which holds an
    # 18 MiB request (the 2 MiB rest is split off); without merging it would need a new segment.
    items = [Item(6 * MiB, 0, 2), Item(6 * MiB, 1, 3), Item(18 * MiB, 4, 5)]
    assert simulate(items).reserved == 20 * MiB
    # Freed in the other order (B's block merges with the free tail first, then with A).
    items = [Item(6 * MiB, 0, 3), Item(6 * MiB, 1, 2), Item(18 * MiB, 4, 5)]
    assert simulate(items).reserved == 20 * MiB

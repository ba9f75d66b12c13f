"""Arena offsets (planner/layout.py): properties over seeded random traces, the MIP against brute
force, and a recorded layer trace.

Oracles written here, not taken from the module: live bytes by scanning every event position, overlap
by comparing every pair, and the optimum of tiny instances by compacting every order of the items
(every layout can be pushed down onto the order of its addresses, so the best compaction is optimal).
"""

from __future__ import annotations

import itertools
import random

import pytest

from longtrain.planner.layout import ALIGN, Item, plan_layout
from longtrain.planner.trace import LayerShape, record_layer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def random_items(rng: random.Random, n: int, horizon: int = 16) -> list[Item]:
    items = []
    for _ in range(n):
        start = rng.randrange(horizon)
        # Sizes not multiples of the alignment, so the rounding is exercised too.
        items.append(
            Item(
                rng.choice([1, 2, 3, 5, 8, 13]) * rng.randint(40, 300), start, rng.randint(start + 1, horizon)
            )
        )
    return items


def max_live(items: list[Item], sizes: list[int]) -> int:
    horizon = max(it.end for it in items)
    return max(
        sum(s for it, s in zip(items, sizes, strict=True) if it.start <= t < it.end) for t in range(horizon)
    )


def assert_valid(items: list[Item], layout) -> list[int]:
    sizes = [-(-it.size // ALIGN) * ALIGN for it in items]
    offs = layout.offsets
    assert all(o >= 0 and o % ALIGN == 0 for o in offs)
    for i, j in itertools.combinations(range(len(items)), 2):
        a, b = items[i], items[j]
        if a.start < b.end and b.start < a.end:  # live together: disjoint bytes
            assert offs[i] + sizes[i] <= offs[j] or offs[j] + sizes[j] <= offs[i], (i, j, items, offs)
    assert layout.peak == max(o + s for o, s in zip(offs, sizes, strict=True))
    assert layout.lower_bound == max_live(items, sizes)
    assert layout.lower_bound <= layout.peak <= layout.greedy_peak
    if layout.search_peak is not None:
        assert layout.lower_bound <= layout.search_peak <= layout.greedy_peak
    if layout.mip_peak is not None:
        assert layout.lower_bound <= layout.mip_peak <= layout.greedy_peak
    return sizes


def best_by_brute_force(items: list[Item], sizes: list[int]) -> int:
    best = None
    for order in itertools.permutations(range(len(items))):
        offs: dict[int, int] = {}
        for i in order:
            a = items[i]
            offs[i] = max(
                (offs[j] + sizes[j] for j in offs if a.start < items[j].end and items[j].start < a.end),
                default=0,
            )
        peak = max(offs[i] + sizes[i] for i in offs)
        best = peak if best is None else min(best, peak)
    assert best is not None
    return best


def test_layouts_of_random_traces_are_valid_and_bounded():
    rng = random.Random(0)
    misses = 0
    for _ in range(300):
        items = random_items(rng, rng.randint(1, 16))
        layout = plan_layout(items, time_limit_s=2.0)
        assert_valid(items, layout)
        misses += layout.greedy_peak > layout.lower_bound
    assert misses >= 10  # the property covers instances where greedy is not already optimal


def test_mip_matches_brute_force_where_greedy_misses():
    rng = random.Random(1)
    solved = 0
    while solved < 8:
        items = random_items(rng, rng.randint(4, 7), horizon=8)
        # search_steps=0: the local search keeps greedy's order, so the MIP runs whenever greedy
        # misses the bound.
        layout = plan_layout(items, time_limit_s=5.0, search_steps=0)
        sizes = assert_valid(items, layout)
        if layout.greedy_peak > layout.lower_bound:
            assert layout.mip_status == "optimal" and layout.mip_peak is not None, layout
            assert layout.peak == layout.mip_peak == best_by_brute_force(items, sizes), (items, layout)
            solved += 1


def test_recorded_layer_trace_layouts_reach_the_bound():
    trace = record_layer(LayerShape(family="qwen2", tokens=128, hidden=64), timing_runs=1)
    for phase in ("forward", "backward"):
        items = [Item(b.size, b.alloc, b.free) for b in trace.phase(phase)]
        layout = plan_layout(items, time_limit_s=5.0)
        assert_valid(items, layout)
        assert layout.peak == layout.lower_bound, (phase, layout)


@pytest.mark.parametrize("kwargs", [dict(align=0), dict(time_limit_s=0.0)])
def test_bad_arguments_name_the_key(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=key):
        plan_layout([Item(64, 0, 1)], **kwargs)

"""Level 1 of the arena plan: an offset for every tensor of one phase (offline dynamic storage
allocation), ``plan_layout(items) -> Layout``.

A tensor is an ``Item``: ``size`` bytes live on the event interval [start, end). Two items whose
intervals intersect must not share bytes; the arena's size is the peak, max(offset + size).

Order of work (DESIGN.md "Arena planning", MEMO §4.2):

1. The lower bound: the most bytes live at one event. No layout does better, and when one reaches
   it there is nothing left to solve.
2. Greedy, largest first, best fit: items by decreasing size (longer lifetime first on ties); each
   goes into the smallest gap between the items already placed that overlap it in time and can hold
   it, else on top of them. Milliseconds for hundreds of items.
3. Only when greedy misses the bound, a local search over orders: any layout is the compaction
   (below) of the order of its addresses, so a seeded annealing moves one item at a time in greedy's
   order and keeps what lowers the compacted peak, until it reaches the bound or ``search_steps``.
   Why it is here: on the backward traces of Llama and Qwen2 layers greedy ends 2.3% above the bound,
   and CBC, warm-started from greedy, improved nothing in 10 s (the big-M relaxation only gives
   back the lower bound row), while this search reached the bound in under half a second.
4. Only when that also misses the bound, MEMO's MIP (CBC through pulp, with a time limit):
   addresses A_i >= 0, the peak M, one binary z_ij per pair of items live together,
       min M  s.t.  A_i + S_i <= M,
                    A_i + S_i <= A_j + z_ij U,   A_j + S_j <= A_i + (1 - z_ij) U,
                    M >= lower bound,
   with U the best peak so far (an optimum never exceeds it, so it is a valid big-M and the
   smallest one) and that layout as CBC's starting solution. The bound row lets CBC stop the moment
   it reaches the lower bound. The items split into groups that no event connects (a moment where
   nothing is live separates them); the peak is the largest group's, so only groups whose peak is
   above the lower bound go to the MIP, one at a time, sharing the time limit.

The MIP's addresses are read back as an order only: the items are stacked in the order of their
addresses, each directly on the highest item below it that it overlaps ("compaction"). That gives
offsets on the alignment grid whatever CBC's float tolerances and a peak no higher than CBC's M.
The layout returned is the best of the three (``method`` says whose), checked for overlap.

Sizes are rounded up to ``align`` bytes (64: a cache line, and more than any dtype needs for a view
into a byte buffer); the lower bound is taken over the rounded sizes, so it bounds the same problem.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

ALIGN = 64
MIP_OVERHEAD_S = 0.5  # kept back from CBC's time limit, so that all stages end within the limit


class Item(NamedTuple):
    size: int
    start: int
    end: int  # exclusive


@dataclass(frozen=True)
class Layout:
    offsets: tuple[int, ...]  # bytes, in the order of the items given
    peak: int  # max(offset + size) over the rounded sizes
    lower_bound: int
    greedy_peak: int
    search_peak: int | None  # None: the search was not needed
    mip_peak: int | None  # None: the MIP was not needed or found nothing
    method: str  # "greedy", "search" or "mip": whose offsets these are
    mip_status: str  # "not needed", "optimal", "time limit", "not run (quick)", or why it failed
    solve_s: float  # all stages, seconds

    @property
    def gap(self) -> float:
        """peak / lower bound - 1 (0: provably optimal)."""
        return self.peak / self.lower_bound - 1.0 if self.lower_bound else 0.0


def rounded(size: int, align: int = ALIGN) -> int:
    return -(-size // align) * align


def live_together(a: Item, b: Item) -> bool:
    return a.start < b.end and b.start < a.end


def lower_bound(items: Sequence[Item]) -> int:
    """The most bytes live at one event (allocations before frees at the same position: [start, end))."""
    events = sorted([(it.start, it.size) for it in items] + [(it.end, -it.size) for it in items])
    live = best = 0
    # Frees (negative) sort before allocations at the same position, as [start, end) requires.
    for _, delta in events:
        live += delta
        best = max(best, live)
    return best


def peak_of(items: Sequence[Item], offsets: Sequence[int]) -> int:
    return max((o + it.size for it, o in zip(items, offsets, strict=True)), default=0)


def overlapping_pairs(items: Sequence[Item], offsets: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs of items live together whose byte ranges intersect (empty for a valid layout)."""
    bad = []
    for i, (a, oa) in enumerate(zip(items, offsets, strict=True)):
        for j in range(i + 1, len(items)):
            b, ob = items[j], offsets[j]
            if live_together(a, b) and oa < ob + b.size and ob < oa + a.size:
                bad.append((i, j))
    return bad


def _neighbours(items: Sequence[Item]) -> list[list[int]]:
    """For each item, the items live together with it (a sweep over start positions)."""
    order = sorted(range(len(items)), key=lambda i: items[i].start)
    nbrs: list[list[int]] = [[] for _ in items]
    active: list[int] = []
    for i in order:
        active = [j for j in active if items[j].end > items[i].start]
        for j in active:
            nbrs[i].append(j)
            nbrs[j].append(i)
        active.append(i)
    return nbrs


def greedy_offsets(items: Sequence[Item]) -> list[int]:
    """Largest first, best fit (module docstring, step 2)."""
    nbrs = _neighbours(items)
    order = sorted(range(len(items)), key=lambda i: (-items[i].size, items[i].start - items[i].end, i))
    offsets: list[int | None] = [None] * len(items)
    for i in order:
        size = items[i].size
        taken = sorted((o, o + items[j].size) for j in nbrs[i] if (o := offsets[j]) is not None)
        best, best_gap, top = None, None, 0
        for lo, hi in taken:
            gap = lo - top
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, hi)
        offsets[i] = top if best is None else best
    return [o if o is not None else 0 for o in offsets]


def compact(items: Sequence[Item], order: Sequence[int]) -> list[int]:
    """Stack the items in ``order`` (bottom first), each on the highest earlier item it overlaps."""
    nbrs = _neighbours(items)
    offsets: list[int | None] = [None] * len(items)
    for i in order:
        offsets[i] = max((o + items[j].size for j in nbrs[i] if (o := offsets[j]) is not None), default=0)
    return [o if o is not None else 0 for o in offsets]


def components(items: Sequence[Item]) -> list[list[int]]:
    """Groups of items connected by live-together chains: maximal runs of events with something live."""
    order = sorted(range(len(items)), key=lambda i: items[i].start)
    groups: list[list[int]] = []
    reach = -1
    for i in order:
        if items[i].start >= reach:
            groups.append([])
        groups[-1].append(i)
        reach = max(reach, items[i].end)
    return groups


def search_order(
    items: Sequence[Item], order: list[int], floor: int, steps: int, time_limit_s: float, seed: int = 0
) -> list[int]:
    """Step 3 of the module docstring: the best order found, starting from ``order``."""
    nbrs = _neighbours(items)

    def peak(o: list[int]) -> int:
        offsets = [0] * len(items)
        placed = [False] * len(items)
        for i in o:
            offsets[i] = max((offsets[j] + items[j].size for j in nbrs[i] if placed[j]), default=0)
            placed[i] = True
        return max(offsets[i] + items[i].size for i in o)

    rng = random.Random(seed)
    best, best_peak = list(order), peak(order)
    current, current_peak = best, best_peak
    # Temperature: a worse move of 0.3% of the bound is taken with probability 1/e at the start,
    # cooling geometrically to 1/1000 of that by the last step.
    temp, cooling = 0.003 * floor, 1e-3 ** (1.0 / max(steps, 1))
    deadline = time.perf_counter() + time_limit_s
    for step in range(steps):
        if best_peak <= floor or (step % 256 == 0 and time.perf_counter() > deadline):
            break
        trial = list(current)
        trial.insert(rng.randrange(len(trial)), trial.pop(rng.randrange(len(trial))))
        p = peak(trial)
        if p <= current_peak or rng.random() < math.exp((current_peak - p) / max(temp, 1e-9)):
            current, current_peak = trial, p
            if p < best_peak:
                best, best_peak = trial, p
        temp *= cooling
    return best


def _mip_order(
    items: Sequence[Item], start: Sequence[int], floor: int, time_limit_s: float
) -> tuple[list[int] | None, str]:
    """The MIP of the module docstring on ``items`` (sizes in units), warm-started at ``start``
    offsets; returns the items' order by address, or None and why."""
    try:
        import pulp
    except ImportError:
        return None, "pulp is not installed"
    n = len(items)
    upper = peak_of(items, start)
    pairs = [(i, j) for i, nb in enumerate(_neighbours(items)) for j in nb if i < j]
    prob = pulp.LpProblem("arena_layout", pulp.LpMinimize)
    addr = [pulp.LpVariable(f"a_{i}", lowBound=0, upBound=upper - it.size) for i, it in enumerate(items)]
    peak = pulp.LpVariable("peak", lowBound=floor, upBound=upper)
    z = {(i, j): pulp.LpVariable(f"z_{i}_{j}", cat="Binary") for i, j in pairs}
    prob += peak
    for i, it in enumerate(items):
        prob += addr[i] + it.size <= peak
    for i, j in pairs:
        prob += addr[i] + items[i].size <= addr[j] + upper * z[i, j]
        prob += addr[j] + items[j].size <= addr[i] + upper * (1 - z[i, j])
    # Greedy's layout as the incumbent CBC starts from (its bound U comes from it as well).
    for i in range(n):
        addr[i].setInitialValue(start[i])
    for i, j in pairs:
        z[i, j].setInitialValue(0 if start[i] < start[j] else 1)
    peak.setInitialValue(upper)
    try:
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, warmStart=True))
    except Exception as e:  # pulp.PulpSolverError, a missing CBC binary, ...
        return None, f"the MIP solver failed ({type(e).__name__}: {e})"
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, f"the MIP found no layout ({pulp.LpStatus.get(prob.status, prob.status)})"
    values = [a.value() for a in addr]
    if any(v is None for v in values):
        return None, "the MIP returned no addresses"
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time limit"
    return sorted(range(n), key=lambda i: (values[i], i)), status


def plan_layout(
    items: Sequence[Item],
    align: int = ALIGN,
    time_limit_s: float = 10.0,
    search_steps: int = 20_000,
    quick: bool = False,
) -> Layout:
    """Offsets for ``items`` (sizes rounded to ``align``): bound, greedy, then search and MIP only
    while the bound is missed; the search and the MIP share ``time_limit_s``. ``quick``: one pass
    of the search (``search_steps`` seeded steps, no restarts) and no MIP, so the work is bounded
    by the steps and the layout is the same whatever the machine's load (unless the pass runs
    into half of ``time_limit_s``)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    t0 = time.perf_counter()
    units = [Item(rounded(it.size, align) // align, it.start, it.end) for it in items]
    bound = lower_bound(units)
    greedy = greedy_offsets(units)
    greedy_peak = peak_of(units, greedy)
    offsets, method = greedy, "greedy"
    status = "not needed"
    search_peak = mip_peak = None
    if greedy_peak > bound:
        # Restarts with the next seed from the best order so far, until the bound or half the time.
        deadline = t0 + time_limit_s / 2
        order = sorted(range(len(units)), key=lambda i: (greedy[i], i))
        seed = 0
        while True:  # each restart returns an order at least as good as the one it started from
            order = search_order(units, order, bound, search_steps, deadline - time.perf_counter(), seed)
            found = compact(units, order)
            found_peak = peak_of(units, found)
            if found_peak <= bound or search_steps == 0 or quick or time.perf_counter() >= deadline:
                break
            seed += 1
        search_peak = found_peak
        if found_peak < greedy_peak:
            offsets, method = found, "search"
    best_peak = peak_of(units, offsets)
    if best_peak > bound and quick:
        status = "not run (quick)"
    elif best_peak > bound:
        offsets, mip_peak, status = _mip(
            units, list(offsets), bound, time_limit_s - (time.perf_counter() - t0)
        )
        if mip_peak is not None and mip_peak < best_peak:
            method = "mip"
    if overlapping_pairs(units, offsets):  # a bug, never a solver tolerance: compaction is exact
        raise AssertionError("layout overlaps live tensors")
    return Layout(
        offsets=tuple(o * align for o in offsets),
        peak=peak_of(units, offsets) * align,
        lower_bound=bound * align,
        greedy_peak=greedy_peak * align,
        search_peak=None if search_peak is None else search_peak * align,
        mip_peak=None if mip_peak is None else mip_peak * align,
        method=method,
        mip_status=status,
        solve_s=time.perf_counter() - t0,
    )


def _mip(
    units: list[Item], start: list[int], bound: int, time_limit_s: float
) -> tuple[list[int], int | None, str]:
    """Step 4 of the module docstring: (offsets, their peak or None if no group was solved, status);
    groups the MIP does not improve keep ``start``'s offsets."""
    t0 = time.perf_counter()
    offsets, status, solved = list(start), "optimal", False
    # The peak is the worst group's: a group at or under the bound needs no MIP.
    for group in components(units):
        sub = [units[i] for i in group]
        sub_start = [start[i] for i in group]
        if peak_of(sub, sub_start) <= bound:
            continue
        left = time_limit_s - (time.perf_counter() - t0)
        order, why = _mip_order(sub, sub_start, bound, left) if left > 0 else (None, "time limit")
        if order is None:
            status = why  # this group and the rest keep their offsets
            break
        solved = True
        if why != "optimal":
            status = why
        sub_mip = compact(sub, order)
        if peak_of(sub, sub_mip) < peak_of(sub, sub_start):
            for k, i in enumerate(group):
                offsets[i] = sub_mip[k]
    return offsets, (peak_of(units, offsets) if solved else None), status

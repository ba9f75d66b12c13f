"""Hybrid data/context parallelism (ByteScale's HDP): the global batch as a globally ordered list of
jobs over one flat group of ranks.

A document longer than the per-rank token capacity C runs on a ring of the fewest ranks whose
zigzag shards fit (about ceil(s / C)); shorter documents are packed onto single ranks, each pack
at most C tokens (one micro-batch). Ranks may run different numbers of micro-batches: the loss is
the sum of token losses over the global token count and gradients are summed, so the result does
not depend on how the batch was cut.

Order and deadlock: every rank runs its jobs in the order of the global list. That alone makes the
schedule deadlock-free: the first unfinished job of the list has all its members done with
everything before it, so all of them are at it and it completes (induction). The planner orders
jobs by planned start time, so that order is also the efficient one.

Balance (``balance=True``): a fitted ``CostModel`` (attention ~ s^2 per document, the rest ~ s,
a fixed cost per micro-batch, ring hops overlapped with attention) predicts every job's time.
Rings are sized first: a ring may get more ranks than its memory needs when its per-rank time
would exceed the step's target (otherwise the longest document alone sets the step time), up to
the size beyond which only communication grows; a few targets are tried and the placement with
the least estimated makespan kept. Rings (longest first) go to the ranks free first and start when
their last member is free; short documents (largest first) then fill the waits before rings
(largest wait first) or go to the rank free first, joining its open pack while it has room (LPT
list scheduling). ``balance=False`` is naive HDP: best-fit packs and minimal rings in data order,
handed to ranks round robin.

``hdp_oracle.milp_lower_bound`` (pulp/CBC, small instances) is the oracle: the least possible maximum per-rank
busy time for the same ring sizes, relaxing ring start synchronisation and pack integrality, so the
heuristic's gap against it is an upper bound on its true gap.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from longtrain.config_checks import ConfigError

from .cost_model import DEFAULT_COST, CostModel, fit_cost_model

CAPACITY_KEY = "parallel.token_capacity"


@dataclass(frozen=True)
class Job:
    """One micro-batch of the global list: documents (indices into the batch), the ranks that run
    it (ring order; one rank = a pack), rows per rank, predicted seconds and planned start."""

    docs: tuple[int, ...]
    ranks: tuple[int, ...]
    local_rows: int
    cost: float
    start: float

    @property
    def layout(self) -> str:
        return "ring" if len(self.ranks) > 1 else "pack"

    def lengths(self, batch: Sequence[int]) -> list[int]:
        return [batch[d] for d in self.docs]

    def cu_seqlens(self, batch: Sequence[int]) -> tuple[int, ...]:
        """The job's documents as one packed stream (DocSpans.cu_seqlens)."""
        cu = [0]
        for s in self.lengths(batch):
            cu.append(cu[-1] + s)
        return tuple(cu)


@dataclass
class HdpPlan:
    jobs: list[Job]  # the global order
    n_ranks: int
    capacity: int
    lengths: tuple[int, ...]
    _per_rank: list[list[Job]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._per_rank = [[] for _ in range(self.n_ranks)]
        for job in self.jobs:
            for r in job.ranks:
                self._per_rank[r].append(job)

    def rank_jobs(self, rank: int) -> list[Job]:
        """The jobs rank runs, in the global order (what keeps rings deadlock-free)."""
        return self._per_rank[rank]

    @property
    def busy(self) -> list[float]:
        return [sum(j.cost for j in js) for js in self._per_rank]

    @property
    def finish(self) -> list[float]:
        """Planned finish per rank, waits for ring partners included (executing in order)."""
        free = [0.0] * self.n_ranks
        for job in self.jobs:
            start = max(free[r] for r in job.ranks)
            for r in job.ranks:
                free[r] = start + job.cost
        return free

    @property
    def makespan(self) -> float:
        return max(self.finish, default=0.0)

    @property
    def imbalance(self) -> float:
        """Makespan over mean busy time (1 = perfect; waits at ring starts count as imbalance)."""
        mean = sum(self.busy) / self.n_ranks
        return self.makespan / mean if mean > 0 else 1.0

    @property
    def busy_imbalance(self) -> float:
        """Max over mean busy time."""
        busy = self.busy
        mean = sum(busy) / self.n_ranks
        return max(busy) / mean if mean > 0 else 1.0


def ring_size(s: int, capacity: int, n_ranks: int, key: str = CAPACITY_KEY) -> int:
    """Fewest ranks whose zigzag shards of a document of s tokens (2 * ceil(s / 2g) rows) fit C."""
    g = max(1, -(-s // capacity))
    while g <= n_ranks:
        if g == 1 and s <= capacity or 2 * -(-s // (2 * g)) <= capacity:
            return g
        g += 1
    raise ConfigError(
        f"a document of {s} tokens does not fit {n_ranks} ranks x {capacity} tokens; raise {key}, "
        "the number of ranks, or lower train.seq_len (the longest document)"
    )


def best_fit_packs(docs: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each document into the fullest pack it fits (rooms kept sorted)."""
    packs: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, pack index), ascending
    for d in sorted(docs, key=lambda d: -lengths[d]):
        s = lengths[d]
        i = bisect.bisect_left(rooms, (s, -1))
        if i == len(rooms):
            packs.append([d])
            bisect.insort(rooms, (capacity - s, len(packs) - 1))
        else:
            room, p = rooms.pop(i)
            packs[p].append(d)
            bisect.insort(rooms, (room - s, p))
    return packs


def plan_hdp(
    lengths: Sequence[int],
    n_ranks: int,
    capacity: int,
    cost: CostModel | None = None,
    balance: bool = True,
    key: str = CAPACITY_KEY,
) -> HdpPlan:
    """The global batch ``lengths`` (tokens per document) as a globally ordered list of jobs."""
    if n_ranks < 1 or capacity < 1:
        raise ValueError(f"need n_ranks >= 1 and capacity >= 1, got {n_ranks}, {capacity}")
    cost = cost or DEFAULT_COST
    lengths = tuple(int(s) for s in lengths)
    docs = [d for d, s in enumerate(lengths) if s > 0]
    sizes = {d: ring_size(lengths[d], capacity, n_ranks, key) for d in docs}
    long_docs = [d for d in docs if sizes[d] > 1]
    short_docs = [d for d in docs if sizes[d] == 1]
    if balance:
        jobs = _balanced(long_docs, short_docs, sizes, lengths, n_ranks, capacity, cost)
    else:
        jobs = _naive(long_docs, short_docs, sizes, lengths, n_ranks, capacity, cost)
    jobs.sort(key=lambda j: (j.start, -len(j.ranks), j.ranks[0], j.docs))
    return HdpPlan(jobs, n_ranks, capacity, lengths)


def _ring_job(free: np.ndarray, d: int, ranks: Sequence[int], lengths, cost: CostModel) -> Job:
    """A ring for document d on ``ranks``: starts when its last member is free."""
    g, idx = len(ranks), list(ranks)
    start = float(free[idx].max())
    c = cost.job_time([lengths[d]], g)
    free[idx] = start + c
    return Job((d,), tuple(int(r) for r in ranks), 2 * -(-lengths[d] // (2 * g)), c, start)


def _naive(long_docs, short_docs, sizes, lengths, n_ranks: int, capacity: int, cost: CostModel) -> list[Job]:
    """ByteScale's naive HDP: best-fit packs and minimal rings in data order, ranks round robin."""
    free = np.zeros(n_ranks)
    jobs: list[Job] = []
    items: list[list[int]] = [[d] for d in long_docs] + best_fit_packs(short_docs, lengths, capacity)
    cursor = 0
    for members in sorted(items, key=lambda m: m[0]):
        g = sizes[members[0]] if len(members) == 1 else 1
        ranks = [(cursor + i) % n_ranks for i in range(g)]
        cursor = (cursor + g) % n_ranks
        if g > 1:
            jobs.append(_ring_job(free, members[0], ranks, lengths, cost))
        else:
            ls = [lengths[d] for d in members]
            jobs.append(Job(tuple(members), (ranks[0],), sum(ls), cost.job_time(ls), float(free[ranks[0]])))
            free[ranks[0]] += jobs[-1].cost
    return jobs


def _place_rings(sizes_: dict[int, int], long_docs, lengths, n_ranks: int, cost: CostModel):
    """Rings, longest first, each on the ranks that are free first. Returns (free time per rank,
    jobs, gaps): a member free before its ring starts waits, and that wait is a gap
    [rank, from, until] that short documents may fill."""
    free = np.zeros(n_ranks)
    jobs: list[Job] = []
    gaps: list[tuple[int, float, float]] = []
    for d in sorted(long_docs, key=lambda d: (-cost.job_time([lengths[d]], sizes_[d]), d)):
        g = sizes_[d]
        ranks = sorted(int(r) for r in (np.argpartition(free, g - 1)[:g] if g < n_ranks else range(n_ranks)))
        before = free[ranks].copy()
        job = _ring_job(free, d, ranks, lengths, cost)
        gaps += [(r, float(t), job.start) for r, t in zip(ranks, before, strict=True) if t < job.start]
        jobs.append(job)
    return free, jobs, gaps


class _Slot:
    """Where short documents go on one rank: a gap before a ring (until = its start) or the tail
    after the rank's last ring (until = inf). Documents join the open pack while it has room."""

    def __init__(self, rank: int, t: float, until: float):
        self.rank, self.t, self.until = rank, t, until
        self.start, self.tokens = t, 0
        self.members: list[int] = []

    def place(self, d: int, s: int, capacity: int, cost: CostModel, jobs: list[Job], lengths) -> bool:
        add = cost.attn * s * s + cost.linear * s
        if self.members and self.tokens + s <= capacity and self.t + add <= self.until:
            self.members.append(d)
            self.tokens += s
            self.t += add
            return True
        if self.t + cost.fixed + add > self.until:
            return False
        self.close(jobs, lengths, cost)
        self.start, self.members, self.tokens = self.t, [d], s
        self.t += cost.fixed + add
        return True

    def close(self, jobs: list[Job], lengths, cost: CostModel) -> None:
        if self.members:
            _close_pack(jobs, self.rank, self.start, self.members, lengths, cost)
            self.members = []


def _balanced(
    long_docs, short_docs, sizes, lengths, n_ranks: int, capacity: int, cost: CostModel
) -> list[Job]:
    """Rings sized and placed for an even finish, then short documents into the waits before rings
    (largest wait first) or LPT onto the rank that is free first.

    A ring may get more ranks than its memory needs (up to the count beyond which only
    communication grows) when its per-rank time would exceed the step's target: otherwise the
    longest document alone sets the step time. The target is tried at a few multiples of the
    lower bound; the ring placement with the least estimated makespan wins."""
    short_tokens = sum(lengths[d] for d in short_docs)
    short_work = sum(cost.attn * lengths[d] ** 2 + cost.linear * lengths[d] for d in short_docs)
    short_work += cost.fixed * -(-short_tokens // capacity)
    tables = {}
    for d in long_docs:
        gs = np.arange(sizes[d], n_ranks + 1, dtype=np.float64)
        times = cost.job_times(lengths[d], gs)
        fastest = int(np.argmin(times))  # beyond it more ranks only add communication
        tables[d] = (gs[: fastest + 1], times[: fastest + 1])
    area = sum(tables[d][1][0] * sizes[d] for d in long_docs) + short_work
    bound = max([area / n_ranks] + [tables[d][1][-1] for d in long_docs])

    def sized(target: float) -> dict[int, int]:
        out = dict(sizes)
        for d in long_docs:
            gs, times = tables[d]
            fits = np.nonzero(times <= target)[0]
            out[d] = int(gs[fits[0]] if len(fits) else gs[-1])
        return out

    best_est = math.inf
    best: tuple[np.ndarray, list[Job], list[tuple[int, float, float]]] | None = None
    tried: set[tuple[int, ...]] = set()
    for factor in (None, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0):
        candidate = sizes if factor is None else sized(bound * factor)
        key = tuple(candidate[d] for d in long_docs)
        if key in tried:
            continue
        tried.add(key)
        placed = _place_rings(candidate, long_docs, lengths, n_ranks, cost)
        ring_area = sum(j.cost * len(j.ranks) for j in placed[1])
        est = max(float(placed[0].max(initial=0.0)), (ring_area + short_work) / n_ranks)
        if est < best_est:
            best_est, best = est, placed
    assert best is not None
    free, ring_jobs, gaps = best
    jobs = list(ring_jobs)
    gap_slots = [_Slot(r, t0, t1) for r, t0, t1 in gaps]
    gap_heap = [(-(sl.until - sl.t), i) for i, sl in enumerate(gap_slots)]  # largest room first
    heapq.heapify(gap_heap)
    tails = [_Slot(r, float(free[r]), math.inf) for r in range(n_ranks)]
    tail_heap = [(sl.t, r) for r, sl in enumerate(tails)]
    heapq.heapify(tail_heap)
    for d in sorted(short_docs, key=lambda d: (-lengths[d], d)):
        s = lengths[d]
        if gap_heap:
            _, i = gap_heap[0]
            if gap_slots[i].place(d, s, capacity, cost, jobs, lengths):
                heapq.heapreplace(gap_heap, (-(gap_slots[i].until - gap_slots[i].t), i))
                continue
        _, r = heapq.heappop(tail_heap)
        tails[r].place(d, s, capacity, cost, jobs, lengths)
        heapq.heappush(tail_heap, (tails[r].t, r))
    for sl in gap_slots + tails:
        sl.close(jobs, lengths, cost)
    return jobs


def _close_pack(jobs: list[Job], r: int, start: float, members: list[int], lengths, cost: CostModel) -> None:
    ls = [lengths[m] for m in members]
    jobs.append(Job(tuple(members), (r,), sum(ls), cost.job_time(ls), start))


def check_plan(plan: HdpPlan) -> None:
    """Raise AssertionError unless: every document is in exactly one job, no rank holds more than C
    rows in any job, ring members are distinct, and executing every rank's jobs in its own order
    (``rank_jobs``) completes (no ring waits on a member that waits elsewhere)."""
    seen = sorted(d for j in plan.jobs for d in j.docs)
    expect = [d for d, s in enumerate(plan.lengths) if s > 0]
    assert seen == expect, f"documents covered {seen} != {expect}"
    for j in plan.jobs:
        assert len(set(j.ranks)) == len(j.ranks), f"ring ranks not distinct: {j}"
        assert all(0 <= r < plan.n_ranks for r in j.ranks), j
        assert j.local_rows <= plan.capacity, f"{j.local_rows} rows > capacity {plan.capacity}: {j}"
        real = sum(plan.lengths[d] for d in j.docs)
        assert j.local_rows * len(j.ranks) >= real, j
    assert_deadlock_free([plan.rank_jobs(r) for r in range(plan.n_ranks)])


def assert_deadlock_free(per_rank: Sequence[Sequence[Job]]) -> None:
    """Run per-rank job queues: a job runs when it is at the head of all its members' queues."""
    heads = [0] * len(per_rank)
    remaining = sum(len(q) for q in per_rank)
    progress = True
    while remaining and progress:
        progress = False
        for r, queue in enumerate(per_rank):
            if heads[r] >= len(queue):
                continue
            job = queue[heads[r]]
            if all(heads[m] < len(per_rank[m]) and per_rank[m][heads[m]] is job for m in job.ranks):
                for m in job.ranks:
                    heads[m] += 1
                remaining -= len(job.ranks)
                progress = True
    stuck = [q[heads[r]] for r, q in enumerate(per_rank) if heads[r] < len(q)]
    assert remaining == 0, f"deadlock: ranks wait at {stuck[:4]}"


def lower_bound_simple(plan: HdpPlan) -> float:
    """max(mean busy, longest job): a trivial makespan lower bound."""
    return max(sum(plan.busy) / plan.n_ranks, max((j.cost for j in plan.jobs), default=0.0))


__all__ = [
    "CAPACITY_KEY",
    "DEFAULT_COST",
    "CostModel",
    "HdpPlan",
    "Job",
    "assert_deadlock_free",
    "check_plan",
    "fit_cost_model",
    "lower_bound_simple",
    "plan_hdp",
    "ring_size",
]

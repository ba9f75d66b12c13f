"""Lock-step rounds of an HDP plan, for sharded model states (``parallel.mode=hdp`` with
``parallel.shard=fsdp``).

FSDP2 all-gathers every layer's parameters in its forward and backward, a collective over all
ranks; the free-running HDP schedule (each rank runs its own jobs, ranks run different numbers of
micro-batches) would have ranks wait in different collectives. In rounds every rank runs exactly
one forward + backward, so every rank reaches the same all-gathers and reduce-scatters in the same
order:

    rounds = build_rounds(plan, cost)  # [round][rank] -> Job or None
    rounds.rank_rounds(rank)           # what a rank runs: its jobs, None = an empty round

A rank without work in a round runs a padding micro-batch (one row, no target: loss 0 and exactly
zero gradients) that joins the round's collectives. All members of a ring are in the ring's round.
Deadlock-free by construction: within a round each rank runs one job, and a ring's members all run
it in that round.

Building: the plan's rings keep their ranks and go, in the global order, into the earliest round
where all their ranks are free (first fit). The short documents are packed again, best fit, into
the fewest packs of at most C tokens (a rank runs one micro-batch per round, so the planner's
small packs that fill waits before rings would each take a round); the largest packs take the
free slots of the longest ring rounds, and the rest fill rounds of their own, n packs a round,
largest together. A round lasts about as long as its longest job (the all-gathers hold the ranks
together layer by layer): ``makespan`` is the sum of those maxima, and padding is the price of
lock-step: a rank idles through a round for which it has no job. On the simulator's default
heavy-tailed batch (64 ranks, context 256K, capacity 16K) 13.8% of rank-rounds are padding and the
rounds take 1.27x the free-running balanced plan's makespan, still 1.90x the static mesh's
throughput (docs/parallel.md has the table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cost_model import DEFAULT_COST, CostModel
from .hdp import HdpPlan, Job, best_fit_packs


@dataclass(frozen=True)
class HdpRounds:
    rounds: list[list[Job | None]]  # [round][rank]; None = the rank runs a padding micro-batch
    n_ranks: int

    def rank_rounds(self, rank: int) -> list[Job | None]:
        return [r[rank] for r in self.rounds]

    @property
    def empty_per_rank(self) -> list[int]:
        """Padding micro-batches per rank."""
        return [sum(r[k] is None for r in self.rounds) for k in range(self.n_ranks)]

    @property
    def empty_fraction(self) -> float:
        """Empty rank-rounds over all rank-rounds (0 = no padding)."""
        total = len(self.rounds) * self.n_ranks
        return sum(self.empty_per_rank) / total if total else 0.0

    @property
    def makespan(self) -> float:
        """Planned step time in lock-step: the sum over rounds of the longest job (padding ~ 0)."""
        return sum(max((j.cost for j in r if j is not None), default=0.0) for r in self.rounds)


def build_rounds(plan: HdpPlan, cost: CostModel = DEFAULT_COST) -> HdpRounds:
    """The plan as lock-step rounds (module docstring); deterministic, so every rank builds the
    same rounds. ``cost``: the model the plan was made with (it prices the new packs)."""
    n = plan.n_ranks
    rounds: list[list[Job | None]] = []
    for job in plan.jobs:  # rings, first fit in the global order
        if len(job.ranks) == 1:
            continue
        r = 0
        while r < len(rounds) and any(rounds[r][m] is not None for m in job.ranks):
            r += 1
        if r == len(rounds):
            rounds.append([None] * n)
        for m in job.ranks:
            rounds[r][m] = job
    # the short documents again as the fewest packs of <= C tokens (one per rank and round)
    short = [d for j in plan.jobs if len(j.ranks) == 1 for d in j.docs]
    packs = []
    for docs in best_fit_packs(short, plan.lengths, plan.capacity):
        ls = [plan.lengths[d] for d in docs]
        packs.append(Job(tuple(docs), (0,), sum(ls), cost.job_time(ls), 0.0))
    packs.sort(key=lambda j: (-j.cost, j.docs))
    # largest packs into the free slots of the longest ring rounds; the rest in rounds of their own,
    # n at a time, largest together (a round lasts as long as its longest job)
    ring_time = [max(j.cost for j in row if j is not None) for row in rounds]
    free = [(i, k) for i, row in enumerate(rounds) for k in range(n) if row[k] is None]
    free.sort(key=lambda slot: (-ring_time[slot[0]], slot))
    for (i, k), pack in zip(free, packs, strict=False):
        rounds[i][k] = dataclasses.replace(pack, ranks=(k,), start=float(i))
    rest = packs[len(free) :]
    busy = [sum(j.cost for row in rounds if (j := row[k]) is not None) for k in range(n)]
    for first in range(0, len(rest), n):
        i = len(rounds)
        row: list[Job | None] = [None] * n
        # the largest pack of the round to the rank least busy so far (even busy time)
        for k, pack in zip(
            sorted(range(n), key=lambda k: (busy[k], k)), rest[first : first + n], strict=False
        ):
            row[k] = dataclasses.replace(pack, ranks=(k,), start=float(i))
            busy[k] += pack.cost
        rounds.append(row)
    if not rounds:  # no document with a target: one round of padding, so every gradient is a zero
        rounds.append([None] * n)  # (as with parallel.shard=none), not missing
    return HdpRounds(rounds, n)


def check_rounds(plan: HdpPlan, rounds: HdpRounds) -> None:
    """Raise AssertionError unless: every document of the plan is in exactly one job of the rounds,
    each ring of the plan is in one round on exactly its ranks, packs hold at most C tokens, every
    round has one slot per rank and some work, and running the rounds (FSDP's all-gather over all
    ranks before each layer, then the layer's part of the rank's job) cannot deadlock."""
    from .hdp import assert_deadlock_free

    seen: list[int] = []
    rings = {job.docs: job.ranks for job in plan.jobs if len(job.ranks) > 1}
    for i, row in enumerate(rounds.rounds):
        assert len(row) == plan.n_ranks, f"round {i} has {len(row)} slots for {plan.n_ranks} ranks"
        assert any(j is not None for j in row) or not plan.jobs, f"round {i} is padding on every rank"
        for k, job in enumerate(row):
            if job is None or k != job.ranks[0]:
                continue
            assert all(row[m] is job for m in job.ranks), f"ring members in different rounds: {job}"
            if len(job.ranks) > 1:
                assert rings.pop(job.docs) == job.ranks, f"ring {job} not on the plan's ranks"
            else:
                assert job.local_rows == sum(plan.lengths[d] for d in job.docs) <= plan.capacity, job
            seen += job.docs
    assert not rings, f"rings not in any round: {rings}"
    expect = sorted(d for j in plan.jobs for d in j.docs)
    assert sorted(seen) == expect, f"documents {sorted(seen)} != the plan's {expect}"
    # every round, per layer: FSDP's all-gather over all ranks, then the layer's part of the rank's
    # job (a ring's hops between its members; a pack or padding alone); two layers show the order
    n_layers = 2
    queues: list[list[Job]] = [[] for _ in range(plan.n_ranks)]
    everyone = tuple(range(plan.n_ranks))
    for i, row in enumerate(rounds.rounds):
        gathers = [Job((), everyone, 0, 0.0, float(i)) for _ in range(n_layers)]
        parts: dict[int, list[Job]] = {}
        for k, job in enumerate(row):
            members = job.ranks if job is not None else (k,)
            key = id(job) if job is not None else -1 - k
            layers = parts.setdefault(key, [Job((), members, 0, 0.0, float(i)) for _ in range(n_layers)])
            for layer in range(n_layers):
                queues[k] += [gathers[layer], layers[layer]]
    assert_deadlock_free(queues)


__all__ = ["HdpRounds", "build_rounds", "check_rounds"]

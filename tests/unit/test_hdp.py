"""The HDP planner: invariants (capacity, coverage, deadlock-free order), cost-model fit, errors,
balance, and the heuristic's gap against the pulp MILP lower bound on small instances."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from longtrain.config_checks import ConfigError
from longtrain.parallel.hdp import (
    CostModel,
    Job,
    assert_deadlock_free,
    check_plan,
    fit_cost_model,
    plan_hdp,
    ring_size,
)
from longtrain.parallel.hdp_oracle import milp_lower_bound
from longtrain.parallel.simulate import heavy_tailed_lengths

SMALL_COST = CostModel(attn=1e-6, linear=1e-3, fixed=0.05, comm=2e-4)


def _random_batch(seed: int, n_docs: int, capacity: int, n_ranks: int) -> list[int]:
    rng = np.random.default_rng(seed)
    short = rng.integers(1, capacity + 1, n_docs)
    # longer than C, within what n ranks hold with zigzag padding (2 * ceil(s / 2g) <= C)
    long_: np.ndarray | list[int] = (
        rng.integers(capacity + 1, (capacity - 1) * n_ranks + 1, n_docs // 10) if n_ranks > 1 else []
    )
    return [int(s) for s in np.concatenate([short, long_, [0]])]  # an empty document too


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize(
    "seed,n_ranks,capacity", [(0, 4, 64), (1, 8, 100), (2, 3, 33), (3, 16, 257), (4, 1, 50)]
)
def test_plan_invariants(seed, n_ranks, capacity, balance):
    lengths = _random_batch(seed, 60, capacity, n_ranks)
    plan = plan_hdp(lengths, n_ranks, capacity, SMALL_COST, balance=balance)
    check_plan(plan)  # every document once, <= C rows per rank per job, deadlock-free order
    assert all(j.local_rows <= capacity for j in plan.jobs)
    for j in plan.jobs:
        if j.layout == "ring":
            assert len(j.docs) == 1 and len(j.ranks) >= ring_size(lengths[j.docs[0]], capacity, n_ranks)
        else:
            assert sum(lengths[d] for d in j.docs) <= capacity
    # every member of a ring reaches it at the same position of the global order
    index = {id(j): i for i, j in enumerate(plan.jobs)}
    for r in range(n_ranks):
        order = [index[id(j)] for j in plan.rank_jobs(r)]
        assert order == sorted(order)


def test_ring_size_counts_zigzag_padding():
    assert ring_size(100, 100, 4) == 1
    assert ring_size(101, 100, 4) == 2
    # C odd: ceil(s / C) = 2 ranks would hold 2 * ceil(21 / 4) = 12 > 11 rows, so 3 ranks
    assert ring_size(21, 11, 4) == 3
    for s in range(1, 200):
        for c in (7, 8, 31):
            if s <= 4 * c:
                try:
                    g = ring_size(s, c, 8)
                except ConfigError:
                    continue
                assert (s if g == 1 else 2 * -(-s // (2 * g))) <= c


def test_document_longer_than_the_job_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="parallel.token_capacity") as e:
        plan_hdp([10, 401], n_ranks=4, capacity=100)
    assert "\n" not in str(e.value) and "401" in str(e.value)


def test_deadlock_checker_catches_crossed_rings():
    a = Job((0,), (0, 1), 1, 1.0, 0.0)
    b = Job((1,), (0, 1), 1, 1.0, 0.0)
    assert_deadlock_free([[a, b], [a, b]])
    with pytest.raises(AssertionError, match="deadlock"):
        assert_deadlock_free([[a, b], [b, a]])


def test_fit_cost_model_recovers_coefficients():
    rng = np.random.default_rng(0)
    true = CostModel(attn=2e-9, linear=3e-6, fixed=4e-3)
    samples = []
    for _ in range(40):
        lengths = [int(s) for s in rng.integers(100, 5000, rng.integers(1, 4))]
        samples.append((lengths, true.job_time(lengths) * (1 + 0.01 * rng.standard_normal())))
    fit = fit_cost_model(samples)
    assert fit.attn == pytest.approx(true.attn, rel=0.05)
    assert fit.linear == pytest.approx(true.linear, rel=0.1)
    assert fit.fixed == pytest.approx(true.fixed, rel=0.3)
    # a negative coefficient is pinned to 0, the rest refitted
    pinned = fit_cost_model([([100], 0.1), ([200], 0.2), ([400], 0.4)])
    assert min(pinned.attn, pinned.linear, pinned.fixed) >= 0
    assert pinned.job_time([300]) == pytest.approx(0.3, rel=1e-6)


def test_balanced_beats_naive_on_heavy_tailed_batch():
    lengths = heavy_tailed_lengths(2048, 262144, seed=1)
    naive = plan_hdp(lengths, 64, 16384, balance=False)
    balanced = plan_hdp(lengths, 64, 16384, balance=True)
    check_plan(balanced)
    assert balanced.makespan < 0.8 * naive.makespan
    assert balanced.imbalance <= 1.10 < naive.imbalance


def test_gap_against_milp_on_small_instances():
    """The heuristic's makespan against the MILP's lower bound (same ring sizes), 6 instances of
    4 ranks x 10 documents: reported, and bounded."""
    gaps, naive_gaps = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        lengths = [int(s) for s in np.concatenate([rng.integers(8, 200, 8), rng.integers(257, 700, 2)])]
        plan = plan_hdp(lengths, 4, 256, SMALL_COST)
        check_plan(plan)
        bound = milp_lower_bound(plan, SMALL_COST)
        assert bound <= plan.makespan * (1 + 1e-9)
        gaps.append(plan.makespan / bound - 1)
        naive_gaps.append(plan_hdp(lengths, 4, 256, SMALL_COST, balance=False).makespan / bound - 1)
    print(
        f"\nHDP gap vs MILP bound: balanced {[round(g, 3) for g in gaps]}, naive {[round(g, 3) for g in naive_gaps]}"
    )
    assert max(gaps) <= 0.2 and statistics.mean(gaps) <= 0.1
    assert statistics.mean(gaps) < statistics.mean(naive_gaps)

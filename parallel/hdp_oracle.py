"""The MILP oracle for the HDP planner (pulp/CBC, small instances only): a lower bound on the
makespan of any plan with the given ring sizes, to report the heuristic's gap in tests."""

from __future__ import annotations

from .cost_model import CostModel
from .hdp import HdpPlan


def milp_lower_bound(plan: HdpPlan, cost: CostModel, time_limit: float = 20.0) -> float:
    """pulp/CBC: the least maximum per-rank busy time over all assignments of the plan's rings (same
    sizes) and short documents to ranks, with ring starts unsynchronised (except that rings too wide
    to share the ranks run in sequence) and each rank's packs only bounded by its token count
    (m_r >= tokens_r / C): a lower bound on the makespan of any plan with these ring sizes."""
    import pulp

    n, c_tok, lengths = plan.n_ranks, plan.capacity, plan.lengths
    rings = [j for j in plan.jobs if len(j.ranks) > 1]
    short = [d for j in plan.jobs if len(j.ranks) == 1 for d in j.docs]
    prob = pulp.LpProblem("hdp_makespan", pulp.LpMinimize)
    z = pulp.LpVariable("z", lowBound=0)
    x = {(i, r): pulp.LpVariable(f"x_{i}_{r}", cat="Binary") for i in range(len(rings)) for r in range(n)}
    y = {(d, r): pulp.LpVariable(f"y_{d}_{r}", cat="Binary") for d in short for r in range(n)}
    m = {r: pulp.LpVariable(f"m_{r}", lowBound=0) for r in range(n)}  # packs: relaxed to continuous
    prob += z
    for i, job in enumerate(rings):
        prob += pulp.lpSum(x[i, r] for r in range(n)) == len(job.ranks)
    for d in short:
        prob += pulp.lpSum(y[d, r] for r in range(n)) == 1
    busy = [pulp.LpVariable(f"b_{r}", lowBound=0) for r in range(n)]
    for r in range(n):
        prob += m[r] * c_tok >= pulp.lpSum(y[d, r] * lengths[d] for d in short)
        for d in short:
            prob += m[r] >= y[d, r]
        work = pulp.lpSum(x[i, r] * job.cost for i, job in enumerate(rings))
        work += pulp.lpSum(y[d, r] * (cost.attn * lengths[d] ** 2 + cost.linear * lengths[d]) for d in short)
        prob += busy[r] == work + cost.fixed * m[r]
        prob += busy[r] <= z
        if r:
            prob += busy[r - 1] >= busy[r]  # ranks are interchangeable: order them by load
    # rings too wide to share the ranks run one after another (valid for any schedule)
    wide = [job.cost for job in rings if 2 * len(job.ranks) > n]
    prob += z >= sum(wide)
    for i, a in enumerate(rings):
        for b in rings[i + 1 :]:
            if len(a.ranks) + len(b.ranks) > n:
                prob += z >= a.cost + b.cost
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    # with a time limit CBC may stop early: its best bound is still a valid lower bound only when
    # solved to optimality, so report the objective only then
    if prob.sol_status != pulp.LpSolutionOptimal:
        raise RuntimeError(f"MILP not solved to optimality (status {prob.sol_status}); raise time_limit")
    return float(pulp.value(z))

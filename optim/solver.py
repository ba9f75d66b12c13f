"""The placement ILP: each sub-group's tier minimising the predicted exposed optimizer time.

Cost model (seconds, from measured bandwidths, ``bandwidth.py``). A sub-group holding ``s`` bytes of
state (m and v) costs, on tier t: a read ``rd`` before its update, the update ``up`` and a write
``wr`` after it:

    device   rd 0                  up 3.5 s / B_device   wr 0
    dram     rd 0                  up 3.5 s / B_dram     wr 0
    cxl      rd s / B_cxl + lat    up 3.5 s / B_dram     wr s / B_cxl + lat
    nvme     rd pad(s) / B_read    up 3.5 s / B_dram     wr pad(s) / B_write

(the CPU AdamW moves 28 bytes per float32 parameter, 3.5x the 8 bytes of its m and v). Schedule,
as the container runs it: the sub-groups in ``arrival_order`` (position k = 0 first) on one reader
thread, one update thread and one writer thread. Time 0 is ``before_last_backward`` (the reads
start), backward ends at B (``backward_s``), sub-group k's gradients are complete at ``ready_k`` =
B x (state bytes of positions <= k) / (all state bytes), and with clipping no update starts before
B (the global norm needs every gradient). A read needs a free staging slot: the slot of the
sub-group ``slots`` positions earlier is free once its update is done. So

    R_k = max(R_{k-1}, U_{k-slots}) + rd_k
    U_k = max(U_{k-1}, R_k, B if clipping else ready_k) + up_k
    W_k = max(W_{k-1}, U_k) + wr_k
    exposed = max(U_last, W_last) - B

The sub-groups whose gradients arrive first have the most of backward left to hide their reads
behind, so the slow tiers go there when the DRAM budget forces some sub-groups off DRAM. With
binaries x[k, t] the durations are linear in x, and each max is a pair of ``>=`` constraints on
continuous R, U, W: minimising the end gives the longest path, i.e. the schedule above exactly.
Capacities: the state of each tier fits it; DRAM holds its state plus the staging slots when any
sub-group is staged. Not modelled: contention between reads and writes on one disk, the CUDA
copies of parameters and gradients (the same on every host tier).

``exposed_seconds`` evaluates the same schedule for a given placement (the tests check the ILP
against it by brute force). ``solve`` runs CBC through pulp with a time limit and returns the
``fallback`` placement (the rule of ``placement.place_subgroups``) with the reason when pulp is
missing or fails, the problem is infeasible or the solver runs out of time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from longtrain.offload.direct_io import padded

from .placement import MAX_SLOTS, STAGED, TIERS, Placement, arrival_order, slot_cost

UPDATE_BYTES_PER_STATE_BYTE = 3.5  # AdamW: p, g, m, v read and p, m, v written per 8 bytes of m, v


@dataclass(frozen=True)
class Rates:
    """Measured bandwidths (GB/s) and the CXL link's latency (s)."""

    dram_gbps: float
    nvme_read_gbps: float = 1.0
    nvme_write_gbps: float = 1.0
    cxl_gbps: float = 20.0
    cxl_latency_s: float = 0.0
    device_gbps: float | None = None  # None: the device is the CPU (dram's bandwidth)


@dataclass(frozen=True)
class Problem:
    """``state_bytes`` per sub-group (model order); ``capacity`` bytes per allowed tier (None: no
    limit); DRAM's includes the staging slots."""

    state_bytes: tuple[int, ...]
    capacity: Mapping[str, int | None]
    rates: Rates
    backward_s: float = 0.0
    clip: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.capacity) - set(TIERS))
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}")

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for t in TIERS if t in self.capacity)

    @property
    def slot_bytes(self) -> int:
        return padded(max(self.state_bytes))

    @property
    def slots(self) -> int:
        """Staging slots a placement with staged sub-groups reserves (as ``place_subgroups``)."""
        dram = self.capacity.get("dram")
        return MAX_SLOTS if dram is None else min(MAX_SLOTS, dram // slot_cost(self.slot_bytes))


def durations(s: int, tier: str, r: Rates) -> tuple[float, float, float]:
    """(read, update, write) seconds of a sub-group with ``s`` state bytes on ``tier``."""
    update = UPDATE_BYTES_PER_STATE_BYTE * s / (r.dram_gbps * 1e9)
    if tier == "device":
        return 0.0, UPDATE_BYTES_PER_STATE_BYTE * s / ((r.device_gbps or r.dram_gbps) * 1e9), 0.0
    if tier == "cxl":
        link = s / (r.cxl_gbps * 1e9) + r.cxl_latency_s
        return link, update, link
    if tier == "nvme":
        return padded(s) / (r.nvme_read_gbps * 1e9), update, padded(s) / (r.nvme_write_gbps * 1e9)
    return 0.0, update, 0.0


def _ready(p: Problem) -> list[float]:
    """Gradient completion time of each arrival position (backward time spread by state bytes)."""
    order = arrival_order(len(p.state_bytes))
    cum = list(itertools.accumulate(p.state_bytes[g] for g in order))
    return [p.backward_s * c / cum[-1] for c in cum]


def exposed_seconds(tiers: Sequence[str], p: Problem) -> float:
    """The schedule of the module docstring for this placement: seconds after backward ends."""
    ready, slots = _ready(p), max(p.slots, 1)
    read = update = write = 0.0
    done: list[float] = []  # U by arrival position
    for k, g in enumerate(arrival_order(len(tiers))):
        rd, up, wr = durations(p.state_bytes[g], tiers[g], p.rates)
        read = max(read, done[k - slots] if k >= slots else 0.0) + rd
        update = max(update, read, p.backward_s if p.clip else ready[k]) + up
        write = max(write, update) + wr
        done.append(update)
    return max(update, write) - p.backward_s


def fits(tiers: Sequence[str], p: Problem) -> bool:
    used = dict.fromkeys(p.capacity, 0)
    for s, t in zip(p.state_bytes, tiers, strict=True):
        if t not in used:
            return False
        used[t] += padded(s) if t == "nvme" else s
    if any(t in STAGED for t in tiers):
        if p.slots < 1:
            return False
        used["dram"] = used.get("dram", 0) + p.slots * slot_cost(p.slot_bytes)
    return all(cap is None or used.get(t, 0) <= cap for t, cap in p.capacity.items())


def placement_of(tiers: Sequence[str], p: Problem, solver: str, note: str = "") -> Placement:
    staged = any(t in STAGED for t in tiers)
    return Placement(
        tuple(tiers),
        p.slots if staged else 0,
        p.slot_bytes if staged else 0,
        solver=solver,
        predicted_exposed_s=exposed_seconds(tiers, p),
        note=note,
    )


def solve(p: Problem, fallback: Placement, time_limit_s: float = 5.0) -> Placement:
    """The ILP's placement (solver "ilp"), else ``fallback`` (solver "greedy") with the reason in
    its ``note`` and its predicted exposed time."""
    tiers, reason = _solve_ilp(p, time_limit_s)
    if tiers is not None:
        return placement_of(tiers, p, "ilp")
    exposed = exposed_seconds(fallback.tiers, p) if set(fallback.tiers) <= set(p.tiers) else None
    return dataclasses.replace(fallback, solver="greedy", predicted_exposed_s=exposed, note=reason)


def _run_cbc(prob, time_limit_s: float) -> tuple[int, int]:
    """(status, solution status) of CBC on ``prob`` (a seam for the tests' time-out case)."""
    import pulp

    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    return prob.status, prob.sol_status


def _solve_ilp(p: Problem, time_limit_s: float) -> tuple[tuple[str, ...] | None, str]:
    try:
        import pulp
    except ImportError:
        return None, "pulp is not installed"
    n, tiers, r = len(p.state_bytes), p.tiers, p.rates
    order = arrival_order(n)
    ready, slots = _ready(p), max(p.slots, 1)
    staged = [t for t in tiers if t in STAGED and p.slots >= 1]
    tiers = tuple(t for t in tiers if t not in STAGED or t in staged)
    # Time in units of a bound on the end (1000 units), so that CBC's absolute tolerances (1e-7 and
    # the like) are small against every duration whatever the sizes.
    bound = sum(max(sum(durations(s, t, r)) for t in tiers) for s in p.state_bytes) + p.backward_s
    unit = 1000.0 / bound

    def dur(g: int, t: str, i: int) -> float:  # i: 0 read, 1 update, 2 write
        return durations(p.state_bytes[g], t, r)[i] * unit

    prob = pulp.LpProblem("optimizer_state_placement", pulp.LpMinimize)
    x = {(g, t): pulp.LpVariable(f"x_{g}_{t}", cat="Binary") for g in range(n) for t in tiers}
    read = [pulp.LpVariable(f"read_{k}", lowBound=0) for k in range(n)]
    upd = [pulp.LpVariable(f"update_{k}", lowBound=0) for k in range(n)]
    write = [pulp.LpVariable(f"write_{k}", lowBound=0) for k in range(n)]
    end = pulp.LpVariable("end", lowBound=0)
    # Ties (common: the update thread is often the bottleneck) go to the rule's choice: faster tiers,
    # and staged sub-groups early in arrival; the weights sum to at most 1e-6 of the bound.
    eps = 1e-3 / (n * (len(TIERS) + 1))
    tie = pulp.lpSum(
        eps * (TIERS.index(t) + (k / n if t in STAGED else 0.0)) * x[g, t]
        for k, g in enumerate(order)
        for t in tiers
    )
    prob += end + tie
    for g in range(n):
        prob += pulp.lpSum(x[g, t] for t in tiers) == 1
    for k, g in enumerate(order):
        rd, up, wr = (pulp.lpSum(dur(g, t, i) * x[g, t] for t in tiers) for i in range(3))
        prob += read[k] >= rd
        if k:
            prob += read[k] >= read[k - 1] + rd
            prob += upd[k] >= upd[k - 1] + up
            prob += write[k] >= write[k - 1] + wr
        if k >= slots:
            prob += read[k] >= upd[k - slots] + rd
        prob += upd[k] >= read[k] + up
        prob += upd[k] >= (p.backward_s if p.clip else ready[k]) * unit + up
        prob += write[k] >= upd[k] + wr
    prob += end >= upd[n - 1]
    prob += end >= write[n - 1]
    if staged:
        any_staged = pulp.LpVariable("any_staged", cat="Binary")
        for g in range(n):
            prob += any_staged >= pulp.lpSum(x[g, t] for t in staged)
    for t in tiers:
        cap = p.capacity[t]
        if cap is None:
            continue
        used = pulp.lpSum((padded(s) if t == "nvme" else s) * x[g, t] for g, s in enumerate(p.state_bytes))
        if t == "dram" and staged:
            used += p.slots * slot_cost(p.slot_bytes) * any_staged
        prob += used <= cap
    try:
        status, sol_status = _run_cbc(prob, time_limit_s)
    except Exception as e:  # pulp.PulpSolverError, a missing CBC binary, ...
        return None, f"the ILP solver failed ({type(e).__name__}: {e})"
    if status == pulp.LpStatusInfeasible:
        return None, "the ILP is infeasible: the state fits no allowed tier within its capacity"
    if status != pulp.LpStatusOptimal or sol_status != pulp.LpSolutionOptimal:
        return None, (
            f"the ILP did not prove an optimum within {time_limit_s:g} s "
            f"({pulp.LpStatus.get(status, status)}, {pulp.LpSolution.get(sol_status, sol_status)})"
        )
    chosen = tuple(max(tiers, key=lambda t: float(x[g, t].value() or 0.0)) for g in range(n))
    if not fits(chosen, p):  # a rounding surprise: never return a placement over a capacity
        return None, "the ILP's answer does not fit the capacities after rounding"
    return chosen, ""

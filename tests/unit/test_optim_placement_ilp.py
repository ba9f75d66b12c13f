"""The placement ILP (optim/solver.py) against brute force over its own cost model.

Oracle: every assignment of the allowed tiers to <= 6 sub-groups, evaluated by
``solver.exposed_seconds`` (the schedule the ILP encodes) and filtered by ``solver.fits``; the
ILP's answer must fit and be as good as the best of them (within the tie-break weights, 1e-6 of the
problem's time bound). Also: the fallback to the greedy rule with its reason, and the auto
placement through ``build_optimizer`` (solver and predicted time in the container's stats).
"""

from __future__ import annotations

import itertools
import random
import sys

import pulp
import pytest
import torch

from longtrain.config_checks import ConfigError
from longtrain.offload.direct_io import padded
from longtrain.optim import OptimConfig, build_optimizer, place_subgroups, solver
from longtrain.optim.placement import slot_cost
from longtrain.trainer.model.adapter import adapt

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MB = 1_000_000


def random_problem(rng: random.Random) -> solver.Problem:
    n = rng.randint(2, 6)
    sizes = tuple(rng.choice([1, 2, 3]) * MB + rng.randrange(0, 5000, 8) for _ in range(n))
    rates = solver.Rates(
        dram_gbps=rng.uniform(5, 40),
        nvme_read_gbps=rng.uniform(0.3, 3),
        nvme_write_gbps=rng.uniform(0.3, 3),
        cxl_gbps=rng.uniform(2, 30),
        cxl_latency_s=rng.choice([0.0, 1e-6]),
        device_gbps=rng.uniform(50, 500),
    )
    tiers = rng.choice([("dram", "nvme"), ("dram", "cxl", "nvme"), ("device", "dram", "cxl", "nvme")])
    capacity = {
        "device": rng.choice([0, 3 * MB]),
        "dram": max(rng.randint(2, 12) * MB, slot_cost(padded(max(sizes)))),  # the rule needs one slot
        "cxl": rng.choice([2 * MB, 6 * MB, None]),
        "nvme": rng.choice([None, 8 * MB]),
    }
    return solver.Problem(
        sizes,
        {t: capacity[t] for t in tiers},
        rates,
        backward_s=rng.choice([0.0, 1e-3, 1e-2]),
        clip=rng.random() < 0.5,
    )


def brute_force(p: solver.Problem) -> float | None:
    feasible = [ts for ts in itertools.product(p.tiers, repeat=len(p.state_bytes)) if solver.fits(ts, p)]
    return min((solver.exposed_seconds(ts, p) for ts in feasible), default=None)


def time_bound(p: solver.Problem) -> float:
    return (
        sum(max(sum(solver.durations(s, t, p.rates)) for t in p.tiers) for s in p.state_bytes) + p.backward_s
    )


def used_bytes(tiers, p: solver.Problem) -> dict[str, int]:
    used = dict.fromkeys(p.tiers, 0)
    for s, t in zip(p.state_bytes, tiers, strict=True):
        used[t] += padded(s) if t == "nvme" else s
    return used


@pytest.mark.parametrize("seed", range(12))
def test_ilp_equals_brute_force_and_respects_capacities(seed):
    p = random_problem(random.Random(seed))
    best = brute_force(p)
    fallback = place_subgroups(p.state_bytes, "auto", p.capacity["dram"])
    placed = solver.solve(p, fallback)
    if best is None:  # nothing fits: the rule's answer, with the reason
        assert placed.solver == "greedy" and "infeasible" in placed.note
        return
    assert placed.solver == "ilp", placed.note
    assert solver.fits(placed.tiers, p)
    assert placed.predicted_exposed_s == pytest.approx(solver.exposed_seconds(placed.tiers, p))
    assert placed.predicted_exposed_s <= best + 1e-6 * time_bound(p)
    used = used_bytes(placed.tiers, p)
    if any(t in ("cxl", "nvme") for t in placed.tiers):
        assert placed.staging_slots == p.slots >= 1 and placed.slot_bytes == padded(max(p.state_bytes))
        used["dram"] += placed.staging_slots * slot_cost(placed.slot_bytes)
    for t, cap in p.capacity.items():
        assert cap is None or used[t] <= cap


def test_slow_tier_goes_to_the_subgroups_whose_gradients_arrive_first():
    """Room in DRAM for two of six equal sub-groups besides the slots, a slow disk and a backward
    long enough to hide reads: the four on nvme are the last in model order (first to arrive)."""
    s = 2 * MB
    dram = 2 * slot_cost(padded(s)) + 2 * s
    rates = solver.Rates(dram_gbps=20, nvme_read_gbps=0.5, nvme_write_gbps=0.5)
    for clip in (True, False):
        p = solver.Problem((s,) * 6, {"dram": dram, "nvme": None}, rates, backward_s=0.05, clip=clip)
        placed = solver.solve(p, place_subgroups(p.state_bytes, "auto", dram))
        assert placed.solver == "ilp"
        assert placed.tiers == ("dram", "dram", "nvme", "nvme", "nvme", "nvme")
        swapped = ("nvme", "nvme", "nvme", "nvme", "dram", "dram")  # dram where gradients arrive first
        assert placed.predicted_exposed_s < solver.exposed_seconds(swapped, p)


def test_falls_back_to_greedy_with_the_reason(monkeypatch):
    s = 2 * MB
    rates = solver.Rates(dram_gbps=20)
    rule = place_subgroups((s,) * 3, "auto", 5 * MB)
    # Infeasible: nvme full, dram too small for everything.
    p = solver.Problem((s,) * 3, {"dram": 5 * MB, "nvme": 0}, rates)
    placed = solver.solve(p, rule)
    assert (placed.solver, placed.tiers) == ("greedy", rule.tiers)
    assert "infeasible" in placed.note
    # Over time: CBC stopped before proving an optimum.
    p = solver.Problem((s,) * 3, {"dram": 5 * MB, "nvme": None}, rates)
    monkeypatch.setattr(
        solver, "_run_cbc", lambda prob, limit: (pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
    )
    placed = solver.solve(p, rule, time_limit_s=0.5)
    assert placed.solver == "greedy" and "did not prove an optimum within 0.5 s" in placed.note
    assert placed.predicted_exposed_s == pytest.approx(solver.exposed_seconds(rule.tiers, p))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pulp", None)  # import pulp raises ImportError
    placed = solver.solve(p, rule)
    assert placed.solver == "greedy" and placed.note == "pulp is not installed"


def tiny(make_tiny_model):
    return adapt(make_tiny_model("llama", dtype=torch.float32, seed=0), "cpu_flash")


def test_auto_uses_the_ilp_and_reports_it(tmp_path, make_tiny_model):
    model = tiny(make_tiny_model)
    cfg = OptimConfig(offload="auto", dram_budget_bytes=100_000, subgroup_params=4000, nvme_dir=str(tmp_path))
    opt = build_optimizer(model, cfg)
    stats = opt.stats()
    assert stats["optim_placement_solver"] == "ilp"
    assert isinstance(stats["optim_predicted_exposed_s"], float) and stats["optim_predicted_exposed_s"] > 0
    assert {"dram", "nvme"} <= set(opt.placement.tiers)
    assert stats["optim_dram_bytes"] <= 100_000
    opt.close()
    fixed = build_optimizer(model, OptimConfig(offload="dram"))
    assert fixed.stats()["optim_placement_solver"] == "rule"
    assert fixed.stats()["optim_predicted_exposed_s"] is None
    fixed.close()


def test_auto_fallback_warns_with_the_reason(tmp_path, make_tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "pulp", None)
    model = tiny(make_tiny_model)
    cfg = OptimConfig(offload="auto", dram_budget_bytes=100_000, subgroup_params=4000, nvme_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"placement ILP gave up \(pulp is not installed\)"):
        opt = build_optimizer(model, cfg)
    assert opt.stats()["optim_placement_solver"] == "greedy"
    opt.close()


def test_budget_smaller_than_one_subgroup_is_one_line_naming_the_key(tmp_path, make_tiny_model):
    model = tiny(make_tiny_model)
    cfg = OptimConfig(offload="auto", dram_budget_bytes=1000, subgroup_params=4000, nvme_dir=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"optim\.dram_budget_bytes=1000 is smaller than one sub-group"
    ) as err:
        build_optimizer(model, cfg)
    assert "\n" not in str(err.value)

"""Sub-groups of parameters and the tier each one's optimizer state lives on.

A sub-group is a run of whole parameter tensors in model order holding about
``optim.subgroup_params`` elements (a tensor larger than that is a sub-group of its own): the unit
that is placed, prefetched and updated. Backward produces gradients in reverse model order, so the
last sub-group's gradients arrive first and give the most time to hide a slow tier behind the rest
of backward: ``arrival_order`` is that order.

``place_subgroups`` is a deterministic rule (below). It returns a ``Placement`` that the container
takes as is; for ``optim.offload=auto`` the placement ILP (``solver.py``, from measured bandwidths)
replaces it, and the rule is the ILP's greedy fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from longtrain.config_checks import ConfigError
from longtrain.offload.direct_io import ALIGN, padded

TIERS = ("device", "dram", "cxl", "nvme")
STAGED = ("cxl", "nvme")  # state copied into a DRAM staging slot for its update, then written back
MAX_SLOTS = 2  # staging slots: one being updated, one being prefetched


def split_subgroups(numels: Sequence[int], subgroup_params: int) -> list[list[int]]:
    """Indices of the tensors (model order) of each sub-group: consecutive whole tensors, a new
    sub-group whenever the next tensor would take the current one past ``subgroup_params``."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        if not groups or (size + n > subgroup_params and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def arrival_order(num_subgroups: int) -> list[int]:
    """The order in which backward completes the sub-groups' gradients: the last layers first."""
    return list(reversed(range(num_subgroups)))


@dataclass(frozen=True)
class Placement:
    tiers: tuple[str, ...]  # per sub-group, model order
    staging_slots: int  # DRAM slots of the staged tiers (cxl, nvme), each of ``slot_bytes``
    slot_bytes: int
    solver: str = "rule"  # rule (place_subgroups) | ilp | greedy (the rule, after the ILP gave up)
    predicted_exposed_s: float | None = None  # the solver's cost model (solver.py); None: not solved
    note: str = ""  # why the solver fell back to the rule

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tiers) - set(TIERS))
        if unknown:
            raise ValueError(f"unknown optimizer-state tier(s) {unknown}; tiers: {', '.join(TIERS)}")
        if any(t in STAGED for t in self.tiers) and self.staging_slots < 1:
            raise ValueError("a placement with cxl or nvme sub-groups needs at least one staging slot")

    def dram_bytes(self, state_bytes: Sequence[int]) -> int:
        """Host DRAM the store holds: dram-tier state plus the staging slots."""
        resident = sum(b for b, t in zip(state_bytes, self.tiers, strict=True) if t == "dram")
        return resident + self.staging_slots * slot_cost(self.slot_bytes)


def slot_cost(slot_bytes: int) -> int:
    """DRAM a staging slot takes: its bytes plus the slack that aligns its start (aligned_buffer)."""
    return slot_bytes + ALIGN if slot_bytes else 0


def _too_small(budget: int, one: int) -> ConfigError:
    return ConfigError(
        f"optim.dram_budget_bytes={budget} is smaller than one sub-group's optimizer state ({one} bytes "
        "with its staging); raise optim.dram_budget_bytes or lower optim.subgroup_params"
    )


def place_subgroups(
    state_bytes: Sequence[int], offload: str, budget: int | None, fixed_bytes: int = 0
) -> Placement:
    """Tiers for sub-groups whose state takes ``state_bytes`` each (model order).

    none / dram / cxl / nvme: every sub-group on that tier (dram must fit ``budget``). auto: all in
    dram when it fits ``budget``; else staging slots are reserved and the sub-groups are taken in
    model order (those whose gradients arrive last, which have the least time to hide a slow tier)
    into dram while they fit; the rest, whose gradients arrive first, go to nvme.
    ``fixed_bytes``: other DRAM the store needs whatever the placement (the CUDA work buffer).
    ``budget`` None: no limit (auto then needs one: the caller resolves it).
    """
    n = len(state_bytes)
    if offload == "none":
        return Placement(("device",) * n, 0, 0)
    if offload not in ("dram", "auto", *STAGED):
        raise ValueError(f"unknown optim.offload {offload!r}")
    avail = None if budget is None else budget - fixed_bytes
    total = sum(state_bytes)
    if offload == "dram" or (offload == "auto" and avail is not None and total <= avail):
        if avail is not None and max(state_bytes) > avail:
            raise _too_small(budget or 0, max(state_bytes) + fixed_bytes)
        if avail is not None and total > avail:
            raise ConfigError(
                f"optim.offload=dram needs {total + fixed_bytes} bytes of host memory but "
                f"optim.dram_budget_bytes={budget}; raise it or set optim.offload=auto (dram + nvme)"
            )
        return Placement(("dram",) * n, 0, 0)
    largest = padded(max(state_bytes))
    cost = slot_cost(largest)  # one staging slot
    if avail is not None and avail < cost:
        raise _too_small(budget or 0, cost + fixed_bytes)
    slots = MAX_SLOTS if avail is None else min(MAX_SLOTS, avail // cost)
    if offload in STAGED:
        return Placement((offload,) * n, slots, largest)
    if avail is None:
        raise ValueError("optim.offload=auto needs a DRAM budget")
    left = avail - slots * cost
    tiers: list[str] = []
    for b in state_bytes:  # model order: the sub-groups whose gradients arrive last first
        fits = (not tiers or tiers[-1] == "dram") and b <= left
        tiers.append("dram" if fits else "nvme")
        left -= b if fits else 0
    return Placement(tuple(tiers), slots, largest)

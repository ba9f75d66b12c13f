"""Predicted time of an HDP job: attention ~ s^2 per document, the rest ~ s, a fixed cost per
micro-batch, ring hops overlapped with the attention of the same step (ByteScale Eq. 3 / WLB-LLM's
W_a + W_l). Fitted from a short profile with ``fit_cost_model``; used by the planner and the
simulator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one job on each of its ranks (forward + backward, all layers).

    attn: seconds per token^2 of one document's causal attention; linear: seconds per token of
    everything row-wise; fixed: seconds per micro-batch; comm: seconds per token of one ring hop of
    K/V (+ dK/dV in backward), overlapped with the attention of the same step.
    """

    attn: float
    linear: float
    fixed: float = 0.0
    comm: float = 0.0

    def job_time(self, lengths: Sequence[int], g: int = 1) -> float:
        """One job: documents ``lengths`` on g ranks (g = 1: a pack; g > 1: a zigzag ring)."""
        t = float(sum(lengths))
        a = float(sum(s * s for s in lengths))
        step_attn = self.attn * a / (g * g)
        return self.fixed + self.linear * t / g + step_attn + (g - 1) * max(step_attn, self.comm * t / g)

    def job_times(self, s: int, gs: np.ndarray) -> np.ndarray:
        """``job_time([s], g)`` for every g in ``gs`` (one document)."""
        step_attn = self.attn * float(s) ** 2 / (gs * gs)
        return (
            self.fixed
            + self.linear * s / gs
            + step_attn
            + (gs - 1) * np.maximum(step_attn, self.comm * s / gs)
        )


# ByteScale Fig. 6(a) read approximately (a 7B model at 128K: attention ~175.5 ms, the rest ~28.2 ms
# per layer; 32 layers); a ring hop moves K, V forward and K, V, dK, dV backward, ~400 KB per token for
# GQA-8 x 128 over 32 layers, at ~100 GB/s per link (an assumption; sweep it): for simulations only.
DEFAULT_COST = CostModel(attn=32 * 0.1755 / 131072**2, linear=32 * 0.0282 / 131072, fixed=5e-3, comm=4e-6)


def fit_cost_model(samples: Sequence[tuple[Sequence[int], float]], comm: float = 0.0) -> CostModel:
    """Least-squares fit of (sum s^2, sum s, 1) -> seconds from profiled packs (lengths, seconds);
    coefficients that come out negative are pinned to 0 and the rest refitted."""
    if len(samples) < 1:
        raise ValueError("fit_cost_model needs at least one (lengths, seconds) sample")
    x = np.array([[sum(s * s for s in ls), sum(ls), 1.0] for ls, _ in samples], dtype=np.float64)
    y = np.array([sec for _, sec in samples], dtype=np.float64)
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        cols = x[:, active]
        norm = np.abs(cols).max(axis=0)
        norm[norm == 0] = 1.0
        sol, *_ = np.linalg.lstsq(cols / norm, y, rcond=None)
        sol = sol / norm
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return CostModel(attn=float(coef[0]), linear=float(coef[1]), fixed=float(coef[2]), comm=comm)


def profile_packs(capacity: int) -> list[list[int]]:
    """Document lengths of the packs ``profile_cost_model`` times, within ``capacity`` tokens: one
    document of the whole capacity, of a half and of a quarter, and packs of halves and quarters
    filling it (equal totals with different sums of squares separate attention from the row-wise
    work; different totals separate the row-wise work from the per-micro-batch constant)."""
    half, quarter = max(capacity // 2, 1), max(capacity // 4, 1)
    return [[capacity], [half, half], [quarter] * 4, [half], [quarter]]

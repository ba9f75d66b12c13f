"""Seconds of a step's pieces, measured on this machine: ``measure_times(model, tokens) -> StepTimes``.

The FLOP-rate model of estimate.py (FLOPs at a fixed fraction of a GPU's peak) says little about
a CPU running a small model, where per-op overhead and memory-bound element-wise ops weigh as
much as the matmuls. As MEMO profiles one decoder layer and plans from it, the planner times the
pieces of a step once, at the job's length, and composes any plan's step time from them
(``estimate.layer_seconds`` with ``times``): how many times a layer's row-wise parts run, how
many tiles, which copies do not hide. The pieces do not depend on the plan, so one profile
predicts every plan of the job.

Every time is the fastest of ``runs`` after a warm-up run: the minimum is what the machine can do,
and other load on it only ever adds to a run. ``clock``: ``time.perf_counter`` (wall time, the
default) or ``time.thread_time`` (the CPU time of the calling thread, which runs the layers with
one torch thread: what another job's load on the machine does not change).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.offload.tiles import run_layer_tiled, tile_bounds
from longtrain.trainer.model.adapter import CausalLM, LayerContext, LayerParts, run_layer, shift_labels
from longtrain.trainer.model.loss_triton import fused_linear_cross_entropy


@dataclass(frozen=True)
class StepTimes:
    """Seconds measured at ``tokens`` rows (one micro-batch on one rank)."""

    tokens: int
    layer_forward_s: float  # one decoder layer's forward, autograd recording (plain)
    layer_backward_s: float  # its backward
    rowwise_forward_s: float  # the layer's row-wise parts alone (forward minus attention)
    tile_s: float  # extra seconds per tile and pass of the row-wise parts (0 when not measured)
    head_s: float  # embedding, final norm, LM head and loss, forward and backward
    optimizer_s: float  # one optimizer step over all parameters


Clock = Callable[[], float]


def _fastest(fn: Callable[[], object], runs: int, clock: Clock) -> float:
    fn()  # warm-up: first-touch allocations, kernel selection
    best = float("inf")
    for _ in range(runs):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def _layer_times(
    parts: LayerParts, x_th: Tensor, ctx: LayerContext, runs: int, clock: Clock
) -> tuple[float, float, float]:
    """(forward, backward, attention forward) seconds of one layer on x_th [t, h]."""
    x = x_th.detach().requires_grad_()
    dy = torch.randn_like(x_th)
    layer = functools.partial(run_layer, parts)
    fwd = _fastest(lambda: parts.call(layer, x, ctx), runs, clock)

    def backward() -> None:
        y = parts.call(layer, x, ctx)
        t0 = clock()
        y.backward(dy)
        times.append(clock() - t0)
        parts.module.zero_grad(set_to_none=True)
        x.grad = None

    times: list[float] = []
    for _ in range(runs + 1):
        backward()
    bwd = min(times[1:])
    q, k, v = parts.call(parts.pre_attention, x, ctx.cos_td, ctx.sin_td)
    attention = _fastest(lambda: ctx.attention(parts, q, k, v), runs, clock)
    return fwd, bwd, attention


def _tile_seconds(
    parts: LayerParts, x_th: Tensor, ctx: LayerContext, tile_rows: int, runs: int, clock: Clock
) -> float:
    """Extra seconds per tile of a tiled forward over the untiled one (both recording autograd)."""
    x = x_th.detach().requires_grad_()
    plain = _fastest(lambda: parts.call(functools.partial(run_layer, parts), x, ctx), runs, clock)
    tiled = _fastest(lambda: run_layer_tiled(parts, x, ctx, tile_rows), runs, clock)
    n_tiles = len(tile_bounds(x_th.shape[0], tile_rows))
    return max(0.0, (tiled - plain) / n_tiles)


def _head_seconds(model: CausalLM, ids_bs: Tensor, runs: int, clock: Clock) -> float:
    targets_t = shift_labels(ids_bs).reshape(-1)

    def step() -> None:
        x_th, _ = model.layer_inputs(ids_bs)
        h = x_th.detach().requires_grad_()
        loss = fused_linear_cross_entropy(model.model.norm(h), model.lm_head.weight, targets_t)
        (loss + (x_th * 0).sum()).backward()  # the embedding's backward too
        model.zero_grad(set_to_none=True)

    return _fastest(step, runs, clock)


def _optimizer_seconds(
    model: CausalLM,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    runs: int,
    clock: Clock,
) -> float:
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(params)
    return _fastest(opt.step, runs, clock)


def measure_times(
    model: CausalLM,
    ids_bs: Tensor,
    tile_rows: int = 0,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    runs: int = 3,
    clock: Clock = time.perf_counter,
) -> StepTimes:
    """The pieces of one step of ``model`` on ``ids_bs`` [b, s] (one micro-batch; its b * s rows
    are the tokens): the first decoder layer stands for all (they are alike); ``tile_rows``: also
    the cost of that tiling; ``make_optimizer``: the optimizer the step runs (default AdamW)."""
    make = make_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
    with torch.no_grad():
        x_th, ctx = model.layer_inputs(ids_bs)
    parts = model.layer_parts[0]
    fwd, bwd, attention = _layer_times(parts, x_th, ctx, runs, clock)
    parts.module.zero_grad(set_to_none=True)
    return StepTimes(
        tokens=x_th.shape[0],
        layer_forward_s=fwd,
        layer_backward_s=bwd,
        rowwise_forward_s=max(0.0, fwd - attention),
        tile_s=_tile_seconds(parts, x_th, ctx, tile_rows, runs, clock) if tile_rows else 0.0,
        head_s=_head_seconds(model, ids_bs, runs, clock),
        optimizer_s=_optimizer_seconds(model, make, runs, clock),
    )

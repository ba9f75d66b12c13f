"""Measure what the alpha formula needs: ``measure(...) -> LayerProfile``.

* bytes: a token-wise forward of one layer on a short probe slice (alpha = 1, its own host store)
  splits its saved bytes into whole tensors and token rows; both scale linearly with the row count.
* T_layer: the first layer's forward at the real length (no grad), the fastest of two warm runs.
* B: a timed write of a layer-sized buffer into the real store (host copy or file write); the
  probe's key is released afterwards, so the store keeps none of its memory.

``resolve_alpha`` turns a profile into alpha with ``cost.tokenwise_alpha``; alpha="auto" runs both
(``auto_alphas``: per tier of a plan) on the first step of every new length, and a benchmark can
call ``measure`` directly to choose alpha and keep_last for a memory budget. Behind an emulated
link (``link.py``) the measured bandwidth is the link's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil
import torch
from torch import Tensor

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer
from longtrain.trainer.model.attention import DocSpans

from .copy_engine import ThreadCopyEngine
from .cost import offloaded_bytes, tokenwise_alpha
from .plan import ActivationPlan, LayerPlan
from .store import ActivationStore, HostStore
from .tiles import resolve_tile_rows, tile_bounds
from .tokenwise import TokenwiseExecutor

PROBE_ROWS = 64


@dataclass(frozen=True)
class LayerProfile:
    """One offloaded decoder layer, measured (the inputs of ``cost.tokenwise_alpha`` per token)."""

    layer_forward_s: float  # one forward of the layer at the measured length, no grad
    copy_bytes_per_s: float  # one write of a layer-sized buffer into the store
    whole_bytes_per_token: float  # offloaded whole: layer input, attention output, logsumexp
    row_bytes_per_token: float  # every other saved tensor, per token row
    rowwise_forward_s: float | None = None  # the forward minus its attention core: a row's recompute
    host_copy_bytes_per_s: float | None = None  # CPU device: a write into the tier itself (no link)


def saved_bytes_per_token(parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> tuple[float, float]:
    """(whole bytes per token, row bytes per token) of one offloaded layer, on a probe slice."""
    r = min(PROBE_ROWS, x_th.shape[0])
    probe_ctx = dataclasses.replace(
        ctx, cos_td=ctx.cos_td[:r], sin_td=ctx.sin_td[:r], docs=DocSpans.single(r)
    )
    engine = ThreadCopyEngine(HostStore(), torch.device("cpu"))
    probe = TokenwiseExecutor({"host": engine}, ActivationPlan((LayerPlan("tokenwise", 1.0),)))
    try:
        x = x_th[:r].detach().requires_grad_(x_th.is_floating_point())
        whole, rows = parts.call(functools.partial(probe.layer_offload_bytes, parts), x, probe_ctx)
    finally:
        probe.close()
    return whole / r, rows / r


def copy_bandwidth(store: ActivationStore, nbytes: int, device: torch.device) -> float:
    """Bytes/s of one write of ``nbytes`` (capped at 64 MiB) into ``store``; the probe's key is
    released after, with its memory."""
    n = max(4096, min(nbytes, 64 * 2**20))
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    key = ("bandwidth-probe",)
    try:
        store.write(key, buf)  # first touch allocates
        t0 = time.perf_counter()
        store.write(key, buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        store.release(key)
    return n / max(seconds, 1e-9)


def _warm_seconds(fn, device: torch.device, runs: int) -> float:
    """The fastest of ``runs`` timed no-grad runs of ``fn`` after an untimed one."""
    times = []
    with torch.no_grad():
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def layer_forward_seconds(parts: LayerParts, x_th: Tensor, ctx: LayerContext, runs: int = 2) -> float:
    """One layer's forward (no grad) at ``x_th``'s length: the fastest of ``runs`` timed runs after
    an untimed one. The first run at a new length is cold (first-touch allocations, kernel setup)
    and measured ~2.5x the warm time, which made alpha="auto" offload more rows than the link hides."""
    return _warm_seconds(
        lambda: parts.call(functools.partial(run_layer, parts), x_th, ctx), x_th.device, runs
    )


def attention_seconds(parts: LayerParts, x_th: Tensor, ctx: LayerContext, runs: int = 2) -> float:
    """The layer's attention core alone (no grad) on q, k, v of ``x_th``: the fastest of ``runs``
    timed runs after an untimed one."""
    with torch.no_grad():
        q, k, v = parts.call(parts.pre_attention, x_th, ctx.cos_td, ctx.sin_td)
    return _warm_seconds(lambda: ctx.attention(parts, q, k, v), x_th.device, runs)


def host_copy_bandwidth(store: ActivationStore, nbytes: int, device: torch.device) -> float | None:
    """On a CPU device, the bandwidth of a write into the tier itself (behind an emulated link: the
    store under it): what a copy costs the CPU's compute. None elsewhere (a copy engine copies)."""
    if device.type != "cpu":
        return None
    return copy_bandwidth(getattr(store, "store", store), nbytes, device)


def measure(
    layers: list[LayerParts],
    x_th: Tensor,
    ctx: LayerContext,
    store: ActivationStore,
) -> LayerProfile:
    """Profile the first of ``layers`` on its input ``x_th`` [t, h] (``CausalLM.layer_inputs``
    gives x_th and ctx), with copies into ``store``."""
    whole_pt, rows_pt = saved_bytes_per_token(layers[0], x_th, ctx)
    layer_s = layer_forward_seconds(layers[0], x_th, ctx)
    attention_s = attention_seconds(layers[0], x_th, ctx)
    nbytes = int((whole_pt + rows_pt) * x_th.shape[0])
    bandwidth = copy_bandwidth(store, nbytes, x_th.device)
    return LayerProfile(
        layer_forward_s=layer_s,
        copy_bytes_per_s=bandwidth,
        whole_bytes_per_token=whole_pt,
        row_bytes_per_token=rows_pt,
        rowwise_forward_s=max(0.0, layer_s - attention_s),
        host_copy_bytes_per_s=host_copy_bandwidth(store, nbytes, x_th.device),
    )


def default_budget(host_budget_bytes: int | None, tier: str, file_dir: str | None) -> int:
    """A tier's byte budget for alpha="auto": activation.host_budget_bytes, else half of the
    available memory (host) or 90% of the free disk under file_dir (file)."""
    if host_budget_bytes is not None:
        return host_budget_bytes
    if tier == "file" and file_dir:
        return int(0.9 * shutil.disk_usage(file_dir).free)
    return int(0.5 * psutil.virtual_memory().available)


def resolve_alpha(
    profile: LayerProfile, t: int, n_offloaded: int, budget_bytes: int, tiles: int = 1
) -> float:
    """alpha for ``t`` tokens and ``n_offloaded`` layers of ``tiles`` row tiles each sharing
    ``budget_bytes`` of one tier, from a measured profile (``cost.tokenwise_alpha``)."""
    alpha = tokenwise_alpha(
        int(profile.whole_bytes_per_token * t),
        int(profile.row_bytes_per_token * t),
        profile.layer_forward_s,
        profile.copy_bytes_per_s,
        n_offloaded,
        budget_bytes,
        tiles,
        profile.rowwise_forward_s,
        profile.host_copy_bytes_per_s,
    )
    # The executor cuts at split_row(alpha, t) <= round(alpha * t) rows; rounding up could overrun the
    # budget (and the copy time) by half a row per layer, so cut at a whole row count.
    return math.floor(alpha * t) / t


def auto_alphas(
    plan: ActivationPlan,
    layers: list[LayerParts],
    x_th: Tensor,
    ctx: LayerContext,
    stores: Mapping[str, ActivationStore],
) -> tuple[list[float | str], dict[str, LayerProfile]]:
    """alpha="auto" for every tokenwise layer of ``plan`` that asks for it: the layer is measured
    once (on the first tier), the copy bandwidth once per tier. The auto layers of a tier share
    what of its budget the tier's fixed-alpha layers leave. Returns (every layer's alpha, each
    measured tier's profile)."""
    t = x_th.shape[0]
    alphas: list[float | str] = [layer.alpha for layer in plan.layers]
    profiles: dict[str, LayerProfile] = {}
    for tier in plan.tiers():
        tokenwise = [
            i for i, layer in enumerate(plan.layers) if layer.mode == "tokenwise" and layer.tier == tier
        ]
        auto = [i for i in tokenwise if alphas[i] == "auto"]
        if not auto:
            continue
        if not profiles:
            prof = measure(layers, x_th, ctx, stores[tier])
        else:  # the layer's bytes and time are the same on every tier; the link is not
            first = next(iter(profiles.values()))
            layer_bytes = int((first.whole_bytes_per_token + first.row_bytes_per_token) * t)
            bandwidth = copy_bandwidth(stores[tier], layer_bytes, x_th.device)
            host_copy = host_copy_bandwidth(stores[tier], layer_bytes, x_th.device)
            prof = dataclasses.replace(first, copy_bytes_per_s=bandwidth, host_copy_bytes_per_s=host_copy)
        profiles[tier] = prof
        whole, rows = int(prof.whole_bytes_per_token * t), int(prof.row_bytes_per_token * t)
        fixed = sum(offloaded_bytes(whole, rows, float(alphas[i]), t, 1) for i in tokenwise if i not in auto)
        budget = default_budget(plan.host_budget_bytes, tier, plan.file_dir) - fixed
        ffn = layers[auto[0]].gate_proj.out_features
        rows = resolve_tile_rows(plan.layers[auto[0]].tile_rows, t, x_th.shape[1], ffn)
        alpha = resolve_alpha(prof, t, len(auto), budget, len(tile_bounds(t, rows)))
        for i in auto:
            alphas[i] = alpha
    return alphas, profiles

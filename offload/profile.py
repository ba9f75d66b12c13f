"""Measure what the alpha formula needs: ``measure(...) -> LayerProfile``.

* bytes: a token-wise forward of one layer on a short probe slice (alpha = 1, its own host store)
  splits its saved bytes into whole tensors and token rows; both scale linearly with the row count.
* T_layer: one timed forward of the first layer at the real length (no grad).
* B: a timed write of a layer-sized buffer into the real store (host copy or file write); the
  probe's key is released afterwards, so the store keeps none of its memory.

``resolve_alpha`` turns a profile into alpha with ``cost.tokenwise_alpha``; alpha="auto" runs both
on the first step of every new length, and a benchmark can call ``measure`` directly to choose
alpha and keep_last for a memory budget.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass

import psutil
import torch
from torch import Tensor

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer
from longtrain.trainer.model.attention import DocSpans

from .config import ActivationConfig
from .copy_engine import ThreadCopyEngine
from .cost import tokenwise_alpha
from .store import ActivationStore, HostStore
from .tokenwise import TokenwiseExecutor

PROBE_ROWS = 64


@dataclass(frozen=True)
class LayerProfile:
    """One offloaded decoder layer, measured (the inputs of ``cost.tokenwise_alpha`` per token)."""

    layer_forward_s: float  # one forward of the layer at the measured length, no grad
    copy_bytes_per_s: float  # one write of a layer-sized buffer into the store
    whole_bytes_per_token: float  # offloaded whole: layer input, attention output, logsumexp
    row_bytes_per_token: float  # every other saved tensor, per token row


def saved_bytes_per_token(
    parts: LayerParts, x_th: Tensor, ctx: LayerContext, param_storages: set[int]
) -> tuple[float, float]:
    """(whole bytes per token, row bytes per token) of one offloaded layer, on a probe slice."""
    r = min(PROBE_ROWS, x_th.shape[0])
    probe_ctx = dataclasses.replace(
        ctx, cos_td=ctx.cos_td[:r], sin_td=ctx.sin_td[:r], docs=DocSpans.single(r)
    )
    probe = TokenwiseExecutor(ThreadCopyEngine(HostStore(), torch.device("cpu")), 1.0, 0, param_storages)
    try:
        x = x_th[:r].detach().requires_grad_(x_th.is_floating_point())
        whole, rows = probe.layer_offload_bytes(parts, x, probe_ctx)
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


def layer_forward_seconds(parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        run_layer(parts, x_th, ctx)
        if x_th.is_cuda:
            torch.cuda.synchronize(x_th.device)
        return time.perf_counter() - t0


def measure(
    layers: list[LayerParts],
    x_th: Tensor,
    ctx: LayerContext,
    store: ActivationStore,
    param_storages: set[int],
) -> LayerProfile:
    """Profile the first of ``layers`` on its input ``x_th`` [t, h] (``CausalLM.layer_inputs``
    gives x_th and ctx), with copies into ``store``. ``param_storages``: the model's parameter
    storages (``tokenwise.parameter_storages``), which are never counted as activations."""
    whole_pt, rows_pt = saved_bytes_per_token(layers[0], x_th, ctx, param_storages)
    layer_s = layer_forward_seconds(layers[0], x_th, ctx)
    bandwidth = copy_bandwidth(store, int((whole_pt + rows_pt) * x_th.shape[0]), x_th.device)
    return LayerProfile(
        layer_forward_s=layer_s,
        copy_bytes_per_s=bandwidth,
        whole_bytes_per_token=whole_pt,
        row_bytes_per_token=rows_pt,
    )


def default_budget(cfg: ActivationConfig) -> int:
    if cfg.host_budget_bytes is not None:
        return cfg.host_budget_bytes
    if cfg.tier == "file" and cfg.file_dir:
        return int(0.9 * shutil.disk_usage(cfg.file_dir).free)
    return int(0.5 * psutil.virtual_memory().available)


def resolve_alpha(profile: LayerProfile, t: int, n_offloaded: int, cfg: ActivationConfig) -> float:
    """alpha for ``t`` tokens and ``n_offloaded`` layers from a measured profile (``cost.tokenwise_alpha``)."""
    alpha = tokenwise_alpha(
        int(profile.whole_bytes_per_token * t),
        int(profile.row_bytes_per_token * t),
        profile.layer_forward_s,
        profile.copy_bytes_per_s,
        n_offloaded,
        default_budget(cfg),
    )
    # The executor cuts at split_row(alpha, t) <= round(alpha * t) rows; rounding up could overrun the
    # budget (and the copy time) by half a row per layer, so cut at a whole row count.
    return math.floor(alpha * t) / t


def auto_alpha(
    layers: list[LayerParts],
    x_th: Tensor,
    ctx: LayerContext,
    store: ActivationStore,
    param_storages: set[int],
    cfg: ActivationConfig,
) -> tuple[float, LayerProfile | None]:
    """alpha="auto": measure, then resolve (1.0 and no profile when no layer is offloaded)."""
    n_offloaded = max(0, len(layers) - cfg.keep_last)
    if n_offloaded == 0:
        return 1.0, None
    profile = measure(layers, x_th, ctx, store, param_storages)
    return resolve_alpha(profile, x_th.shape[0], n_offloaded, cfg), profile

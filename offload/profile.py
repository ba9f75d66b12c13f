"""Measure what the alpha formula needs, once, on the first step of a given length.

* bytes: a token-wise forward of one layer on a short probe slice (alpha = 1, host store) splits
  its saved bytes into whole tensors and token rows; both scale linearly with the row count.
* T_layer: one timed forward of the first layer at the real length (no grad).
* B: a timed write of a layer-sized buffer into the real store (host copy or file write).
"""

from __future__ import annotations

import dataclasses
import math
import time

import psutil
import torch
from torch import Tensor

from longtrain.trainer.model.adapter import LayerContext, LayerParts, run_layer
from longtrain.trainer.model.attention import DocSpans

from .config import ActivationConfig
from .copy_engine import ThreadCopyEngine
from .cost import tokenwise_alpha
from .store import HostStore

PROBE_ROWS = 64


def saved_bytes_per_row(
    parts: LayerParts, x_th: Tensor, ctx: LayerContext, param_storages: set[int]
) -> tuple[float, float]:
    """(whole bytes per token, row bytes per token) of one offloaded layer, measured on a probe slice."""
    from .tokenwise import TokenwiseExecutor

    r = min(PROBE_ROWS, x_th.shape[0])
    probe_ctx = dataclasses.replace(
        ctx, cos_td=ctx.cos_td[:r], sin_td=ctx.sin_td[:r], docs=DocSpans.single(r)
    )
    store = HostStore()
    probe = TokenwiseExecutor(ThreadCopyEngine(store, torch.device("cpu")), 1.0, 0, param_storages)
    with torch.enable_grad():
        x = x_th[:r].detach().requires_grad_(x_th.is_floating_point())
        probe._forward_offloaded(parts, x, probe_ctx, r, r)
    probe._wait_offloads(parts.index)
    whole = sum(b.numel() * b.element_size() for k, b in store._buffers.items() if k[1] == "whole")
    rows = sum(b.numel() * b.element_size() for k, b in store._buffers.items() if k[1] == "rows")
    probe.engine.close()
    return whole / r, rows / r


def copy_bandwidth(store, nbytes: int, device: torch.device) -> float:
    """Bytes/s of one write of ``nbytes`` (capped at 64 MiB) into ``store``."""
    n = max(4096, min(nbytes, 64 * 2**20))
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    key = ("bandwidth-probe",)
    store.write(key, buf)  # first touch allocates
    t0 = time.perf_counter()
    store.write(key, buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if hasattr(store, "_live"):
        store._live.discard(key)
    return n / max(seconds, 1e-9)


def default_budget(cfg: ActivationConfig) -> int:
    if cfg.host_budget_bytes is not None:
        return cfg.host_budget_bytes
    if cfg.tier == "file" and cfg.file_dir:
        import shutil

        return int(0.9 * shutil.disk_usage(cfg.file_dir).free)
    return int(0.5 * psutil.virtual_memory().available)


def resolve_alpha(
    executor, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext, cfg: ActivationConfig
) -> float:
    """alpha="auto": measure the layer and the link, then apply ``cost.tokenwise_alpha``."""
    t = x_th.shape[0]
    n_offloaded = max(0, len(layers) - cfg.keep_last)
    if n_offloaded == 0:
        return 1.0
    whole_pt, rows_pt = saved_bytes_per_row(layers[0], x_th, ctx, executor.param_storages)
    with torch.no_grad():
        t0 = time.perf_counter()
        run_layer(layers[0], x_th, ctx)
        if x_th.is_cuda:
            torch.cuda.synchronize(x_th.device)
        layer_s = time.perf_counter() - t0
    bandwidth = copy_bandwidth(executor.engine.store, int((whole_pt + rows_pt) * t), x_th.device)
    alpha = tokenwise_alpha(
        int(whole_pt * t), int(rows_pt * t), layer_s, bandwidth, n_offloaded, default_budget(cfg)
    )
    # The executor cuts at split_row(alpha, t) <= round(alpha * t) rows; rounding up could overrun the
    # budget (and the copy time) by half a row per layer, so cut at a whole row count.
    alpha = math.floor(alpha * t) / t
    executor.profile = {
        "layer_forward_s": layer_s,
        "copy_bytes_per_s": bandwidth,
        "whole_bytes_per_token": whole_pt,
        "row_bytes_per_token": rows_pt,
    }
    return alpha

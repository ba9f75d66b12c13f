"""Bandwidths of the optimizer-state tiers, measured on this machine (the placement solver's input).

    dram_stream_gbps()           in-place ``a += s * b`` over float32 buffers, bytes read + written
    disk_gbps(directory)         (read, write) GB/s of O_DIRECT whole-file transfers in ``directory``
    cxl_gbps(node, emulated)     the emulated link's configured rate, or a copy into the node's memory

The probes are small (tens of MiB, well under a second on a virtio disk) and each result is cached
for the process: a second container, or a solver run in a test, measures nothing again. They use
the same code as the tiers (``direct_io``, the registered aligned buffers), so a probe sees what the
tier will see. ``scripts/bench_optim_offload.py`` uses ``stream_samples`` for its floor too.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longtrain.offload.direct_io import aligned_buffer, bytes_of, open_direct, pread_exact, pwrite_exact

PROBE_BYTES = 32 * 2**20


def stream_samples(nbytes: int, repeats: int) -> list[float]:
    """GB/s of ``repeats`` passes of ``a += 0.5 * b`` over two float32 buffers of ``nbytes`` each,
    counting 3 * nbytes per pass (a and b read, a written in place: AdamW's in-place pattern), with
    the current torch thread count. One warm-up pass first (page faults, thread start-up)."""
    numel = nbytes // 4
    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b, alpha=0.5)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        a.add_(b, alpha=0.5)
        out.append(3 * numel * 4 / (time.perf_counter() - start) / 1e9)
    return out


@functools.cache
def dram_stream_gbps() -> float:
    """DRAM stream bandwidth, GB/s (median of 5 passes over 64 MiB buffers; cached)."""
    return statistics.median(stream_samples(64 * 2**20, 5))


@functools.cache
def _disk_gbps(directory: str) -> tuple[float, float]:
    buf = aligned_buffer(PROBE_BYTES)
    buf.fill_(7)
    data = bytes_of(buf)
    fd_, name = tempfile.mkstemp(prefix=".longtrain-bw-", dir=directory)
    os.close(fd_)
    fd, direct, _ = open_direct(name, os.O_RDWR)
    try:
        what = f"the bandwidth probe {name}"
        start = time.perf_counter()
        pwrite_exact(fd, data, 0, what, direct=direct)
        os.fsync(fd)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        pread_exact(fd, data, 0, what, direct=direct)
        read_s = time.perf_counter() - start
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
    return PROBE_BYTES / read_s / 1e9, PROBE_BYTES / write_s / 1e9


def disk_gbps(directory: str | Path) -> tuple[float, float]:
    """(read, write) GB/s of one O_DIRECT transfer of 32 MiB in ``directory`` (which must exist and
    be writable; cached per directory)."""
    return _disk_gbps(str(Path(directory).resolve()))


@functools.cache
def cxl_gbps(node: int | None, configured_gbps: float) -> float:
    """The CXL tier's copy bandwidth: ``configured_gbps`` when emulated (``node`` None: the tier
    sleeps to exactly that rate), else a measured copy from DRAM into the node's memory."""
    if node is None:
        return configured_gbps
    from .tiers import _NumaAlloc  # libnuma, only where the host has the node

    alloc = _NumaAlloc(node)
    try:
        dst = alloc.empty(PROBE_BYTES)
        src = aligned_buffer(PROBE_BYTES)
        np.copyto(bytes_of(dst), bytes_of(src))  # fault the pages in first
        start = time.perf_counter()
        np.copyto(bytes_of(dst), bytes_of(src))
        return PROBE_BYTES / (time.perf_counter() - start) / 1e9
    finally:
        alloc.free_all()

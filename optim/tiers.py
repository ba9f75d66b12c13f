"""The staged tiers of optimizer state: CXL memory and NVMe files.

A staged sub-group's state (m then v, flat, in the master dtype) lives on its tier between steps;
for its update it is loaded into a DRAM staging slot (an aligned registered host buffer the
container allocates once) and stored back afterwards. Both tiers move whole sub-groups:

    tier.load(g, slot)    tier -> slot (the first ``nbytes(g)`` bytes of the slot)
    tier.store(g, slot)   slot -> tier

``NvmeTier``: one file under ``optim.nvme_dir``, one region per sub-group starting on a 4 KiB
boundary and padded to a multiple of 4 KiB, read and written whole with O_DIRECT (direct_io.py), so
the state does not stay behind in the page cache. A new file reads back as zeros: the initial state.

``CxlTier``: memory of a CPU-less NUMA node (a CXL Type-3 expander), allocated there with libnuma
(``numa_alloc_onnode``, an mbind to the node). On a host without such a node it is emulated: DRAM,
and every transfer sleeps until it has taken at least ``bytes / bandwidth + latency``. The CPU
update never runs on CXL memory directly: naive placement makes the CPU step ~4x slower
(reference/offload.md section 2), so the state is staged into DRAM like the NVMe tier's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from longtrain.config_checks import ConfigError
from longtrain.offload.direct_io import (
    bytes_of,
    check_dir,
    open_direct,
    padded,
    pread_exact,
    pwrite_exact,
)
from longtrain.offload.memory import host_empty

NODE_SYSFS = Path("/sys/devices/system/node")


class StagedTier(Protocol):
    name: str

    def load(self, g: int, slot: Tensor) -> None: ...

    def store(self, g: int, slot: Tensor) -> None: ...

    def nbytes(self) -> int:
        """Bytes the tier holds (padded file regions; CXL buffers)."""
        ...

    def close(self) -> None: ...


class NvmeTier:
    """Sub-group states in one O_DIRECT file under ``directory``."""

    name = "nvme"

    def __init__(self, directory: str | Path, sizes: Mapping[int, int]):
        """``sizes``: state bytes of each sub-group this tier holds."""
        self._offsets: dict[int, int] = {}
        self._sizes = dict(sizes)
        end = 0
        for g, nbytes in sizes.items():
            self._offsets[g] = end
            end += padded(nbytes)
        self._end = end
        path = check_dir(directory, "optim.nvme_dir", need_bytes=end)
        # A fresh file per store: two containers in one directory never share regions.
        fd, name = tempfile.mkstemp(prefix=f"optim-state-{os.getpid()}-", suffix=".bin", dir=path)
        os.close(fd)
        self.path = Path(name)
        self._fd, self.direct, refusal = open_direct(self.path, os.O_RDWR)
        if refusal is not None:
            warnings.warn(
                f"optim.nvme_dir {str(path)!r} refuses O_DIRECT ({refusal.strerror}): the NVMe tier writes "
                "through the page cache, which keeps its bytes in memory; point optim.nvme_dir at a local disk",
                stacklevel=2,
            )
        self._what = f"the optimizer-state file {self.path}"
        os.ftruncate(self._fd, end)  # unwritten regions read as zeros: the initial state
        self._finalizer = weakref.finalize(self, _close_and_unlink, self._fd, self.path)

    def _region(self, g: int, slot: Tensor) -> tuple[np.ndarray, int]:
        nbytes = padded(self._sizes[g])
        if slot.numel() < nbytes:
            raise ValueError(f"staging slot of {slot.numel()} bytes is smaller than sub-group {g}'s {nbytes}")
        return bytes_of(slot[:nbytes]), self._offsets[g]

    def load(self, g: int, slot: Tensor) -> None:
        data, offset = self._region(g, slot)
        pread_exact(self._fd, data, offset, self._what, direct=self.direct)

    def store(self, g: int, slot: Tensor) -> None:
        # The whole padded region: the pad bytes after the state land in the region's own padding.
        data, offset = self._region(g, slot)
        pwrite_exact(self._fd, data, offset, self._what, direct=self.direct, hint="; is optim.nvme_dir full?")

    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._finalizer()  # once: close the file and delete it
        self._fd = -1


def _close_and_unlink(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)


def numa_nodes(sysfs: Path | None = None) -> dict[int, bool]:
    """NUMA nodes of this host -> whether the node has CPUs (from sysfs; {} where there is none)."""
    root = sysfs or NODE_SYSFS
    nodes: dict[int, bool] = {}
    for d in sorted(root.glob("node[0-9]*")) if root.is_dir() else []:
        cpulist = d / "cpulist"
        nodes[int(d.name[4:])] = cpulist.is_file() and bool(cpulist.read_text().strip())
    return nodes


def node_free_bytes(node: int, sysfs: Path | None = None) -> int:
    """Free memory of NUMA node ``node`` (its sysfs meminfo ``MemFree``), bytes."""
    meminfo = (sysfs or NODE_SYSFS) / f"node{node}" / "meminfo"
    for line in meminfo.read_text().splitlines():
        if "MemFree:" in line:
            return int(line.split()[-2]) * 1024
    raise OSError(f"no MemFree line in {meminfo}")


def resolve_cxl_node(requested: int | None) -> int | None:
    """The NUMA node of the CXL tier: ``requested`` (it must exist), else the first CPU-less node;
    None: the host has none, the tier is emulated."""
    nodes = numa_nodes()
    if requested is not None:
        if requested not in nodes:
            have = ", ".join(map(str, nodes)) or "none found"
            raise ConfigError(
                f"optim.cxl_node={requested} is not a NUMA node of this host (nodes: {have}); "
                "unset optim.cxl_node to emulate the CXL tier in DRAM"
            )
        return requested
    cpu_less = [n for n, has_cpus in nodes.items() if not has_cpus]
    return cpu_less[0] if cpu_less else None


class _NumaAlloc:
    """Buffers bound to one NUMA node through libnuma."""

    def __init__(self, node: int):
        name = ctypes.util.find_library("numa")
        if name is None:
            raise ConfigError(
                f"optim.cxl_node={node} needs libnuma (apt-get install libnuma1); unset optim.cxl_node to emulate"
            )
        lib = ctypes.CDLL(name)
        lib.numa_available.restype = ctypes.c_int
        if lib.numa_available() < 0:
            raise ConfigError(f"optim.cxl_node={node}: libnuma reports no NUMA support on this host")
        lib.numa_alloc_onnode.restype = ctypes.c_void_p
        lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._lib, self._node = lib, node
        self._held: list[tuple[int, int]] = []

    def empty(self, nbytes: int) -> Tensor:
        ptr = self._lib.numa_alloc_onnode(nbytes, self._node)
        if not ptr:
            raise MemoryError(f"numa_alloc_onnode({nbytes}, node {self._node}) failed")
        self._held.append((ptr, nbytes))
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)

    def free_all(self) -> None:
        for ptr, nbytes in self._held:
            self._lib.numa_free(ptr, nbytes)
        self._held.clear()


class CxlTier:
    """Sub-group states in CXL memory (``node``), or in DRAM behind an emulated link (node None)."""

    name = "cxl"

    def __init__(self, sizes: Mapping[int, int], node: int | None, bandwidth_gbps: float, latency_us: float):
        self.node = node
        self.emulated = node is None
        self._bytes_per_s = bandwidth_gbps * 1e9
        self._latency_s = latency_us * 1e-6
        self._numa = None if node is None else _NumaAlloc(node)
        if self.emulated:
            warnings.warn(
                f"optim: this host has no CPU-less NUMA node, so the CXL tier is emulated: DRAM behind a "
                f"{bandwidth_gbps:g} GB/s link with {latency_us:g} us per transfer "
                "(optim.cxl_bandwidth_gbps, optim.cxl_latency_us)",
                stacklevel=2,
            )
        self._buffers: dict[int, Tensor] = {}
        for g, nbytes in sizes.items():
            buf = host_empty(nbytes) if self._numa is None else self._numa.empty(nbytes)
            buf.zero_()  # the initial state
            self._buffers[g] = buf

    def _transfer(self, dst: Tensor, src: Tensor) -> None:
        start = time.perf_counter()
        np.copyto(bytes_of(dst), bytes_of(src))  # one memcpy, no OpenMP team on the I/O thread
        if self.emulated:
            floor = dst.numel() / self._bytes_per_s + self._latency_s
            left = floor - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)

    def load(self, g: int, slot: Tensor) -> None:
        buf = self._buffers[g]
        self._transfer(slot[: buf.numel()], buf)

    def store(self, g: int, slot: Tensor) -> None:
        buf = self._buffers[g]
        self._transfer(buf, slot[: buf.numel()])

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def close(self) -> None:
        self._buffers.clear()
        if self._numa is not None:
            self._numa.free_all()

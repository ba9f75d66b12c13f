"""Hardware descriptions for the planner: ``hardware(name, gpus_per_node=None)``.

    a800_80g | a100_80g | h100_80g | h200_141g   vendor datasheets + their reference 8-GPU nodes
    cpu                                          this machine, measured when called

Every bandwidth is bytes/s in one direction, every capacity bytes. Device numbers are the SXM
parts' datasheet values (bf16 dense, without sparsity). Node numbers (host DRAM, NVMe, network)
are those of NVIDIA's reference systems (DGX A100 640GB, DGX H100, DGX H200); a cluster built
from other nodes should override them (``dataclasses.replace``). Where a datasheet gives a peak
the links never reach (PCIe), the achievable figure is used and the comment says so.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace

import torch

from longtrain.config_checks import ConfigError

GB = 10**9
TB = 10**12
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One kind of node: ``gpus_per_node`` devices and the host they share.

    device_bytes: memory of one device.  flops: bf16 dense peak FLOP/s of one device.
    device_to_host_bps: achievable copy bandwidth between one device and pinned host memory, per
    direction.  nvlink_bps: device-to-device bandwidth within a node, per direction.
    network_bps: bandwidth between nodes per device (one NIC per GPU on the reference nodes).
    host_bytes / host_bps: DRAM capacity and bandwidth of the node (shared by its devices).
    nvme_bytes / nvme_read_bps / nvme_write_bps: the node's data NVMe (RAID 0 of its drives).
    nvme_dwpd: drive writes per day the NVMe is rated for; the file tier writes no faster than
    ``nvme_dwpd x nvme_bytes`` a day (one file-tier step rewrites its activations).
    reserved_bytes: device memory not available to tensors (CUDA context, NCCL buffers, allocator
    slack); the planner budgets ``device_bytes - reserved_bytes``.
    """

    name: str
    device_bytes: int
    flops: float
    device_to_host_bps: float
    nvlink_bps: float
    network_bps: float
    host_bytes: int
    host_bps: float
    nvme_bytes: int
    nvme_read_bps: float
    nvme_write_bps: float
    gpus_per_node: int = 8
    reserved_bytes: int = 3 * GIB
    nvme_dwpd: float = 1.0  # Samsung PM1733 datasheet: 1 DWPD for 5 years (typical read-intensive U.2)

    def __post_init__(self) -> None:
        for name in (
            "device_bytes",
            "flops",
            "device_to_host_bps",
            "host_bytes",
            "host_bps",
            "gpus_per_node",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"hardware {self.name}: {name} must be > 0, got {getattr(self, name)}")

    @property
    def nvme_endurance_bps(self) -> float:
        """Bytes/s the node's NVMe may be written on average without wearing out before its rating."""
        return self.nvme_dwpd * self.nvme_bytes / 86400

    @property
    def usable_device_bytes(self) -> int:
        return self.device_bytes - self.reserved_bytes


# PCIe: Gen4 x16 is 32 GB/s per direction raw (NVIDIA quotes 64 GB/s, both directions added);
# pinned copies reach ~80% of it, 25 GB/s. Gen5 x16: 64 GB/s per direction raw, ~50 GB/s achieved.
_PCIE4 = 25 * GB
_PCIE5 = 50 * GB
# NVMe: the reference nodes' data cache is 8 x 3.84 TB U.2 Gen4 drives (DGX A100 640GB, DGX H100
# and DGX H200 user guides). A Gen4 U.2 drive of that class reads ~7 GB/s and writes ~3.8 GB/s
# sequentially (Samsung PM1733 datasheet); RAID 0 over 8: ~50 / ~25 GB/s (typical, assumed: the
# guides give capacity, not bandwidth).
_NVME_BYTES = 8 * 3840 * GB
_NVME_READ = 50 * GB
_NVME_WRITE = 25 * GB
_DGX_DRAM = 2 * TB  # DGX A100 640GB, DGX H100, DGX H200 system specs: 2 TB system memory

KNOWN: dict[str, Hardware] = {
    # NVIDIA A800 80GB SXM datasheet: 80 GB HBM2e, BF16 312 TFLOPS dense, NVLink 400 GB/s (the
    # A100's 600 GB/s capped; per direction 200 GB/s), PCIe Gen4. Node: MEMO's 8 x A800 nodes have
    # 2 TB of host memory (reference/memo.md section 1); the rest as the DGX A100 640GB: 2 x AMD
    # EPYC 7742, 8 channels DDR4-3200 each (2 x 204.8 GB/s), 8 x 200 Gb/s HDR InfiniBand.
    "a800_80g": Hardware(
        name="a800_80g",
        device_bytes=80 * GIB,
        flops=312e12,
        device_to_host_bps=_PCIE4,
        nvlink_bps=200 * GB,
        network_bps=25 * GB,
        host_bytes=_DGX_DRAM,
        host_bps=409.6 * GB,
        nvme_bytes=_NVME_BYTES,
        nvme_read_bps=_NVME_READ,
        nvme_write_bps=_NVME_WRITE,
    ),
    # NVIDIA A100 80GB SXM datasheet: 80 GB HBM2e, BF16 312 TFLOPS dense, NVLink 600 GB/s (300 per
    # direction), PCIe Gen4. Node: DGX A100 640GB system specs (2 TB DRAM, 30 TB NVMe, 8 x 200 Gb/s).
    "a100_80g": Hardware(
        name="a100_80g",
        device_bytes=80 * GIB,
        flops=312e12,
        device_to_host_bps=_PCIE4,
        nvlink_bps=300 * GB,
        network_bps=25 * GB,
        host_bytes=_DGX_DRAM,
        host_bps=409.6 * GB,
        nvme_bytes=_NVME_BYTES,
        nvme_read_bps=_NVME_READ,
        nvme_write_bps=_NVME_WRITE,
    ),
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3, BF16 989 TFLOPS dense (1979 with sparsity), NVLink
    # 900 GB/s (450 per direction), PCIe Gen5. Node: DGX H100 system specs: 2 TB DRAM (2 x Xeon
    # Platinum 8480C, 8 channels DDR5-4800 each: 2 x 307 GB/s), 30 TB NVMe, 8 x 400 Gb/s ConnectX-7.
    "h100_80g": Hardware(
        name="h100_80g",
        device_bytes=80 * GIB,
        flops=989e12,
        device_to_host_bps=_PCIE5,
        nvlink_bps=450 * GB,
        network_bps=50 * GB,
        host_bytes=_DGX_DRAM,
        host_bps=614 * GB,
        nvme_bytes=_NVME_BYTES,
        nvme_read_bps=_NVME_READ,
        nvme_write_bps=_NVME_WRITE,
    ),
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e, BF16 989 TFLOPS dense, NVLink 900 GB/s, PCIe Gen5.
    # Node: DGX H200 system specs (the DGX H100's host: 2 TB DRAM, 30 TB NVMe, 8 x 400 Gb/s).
    "h200_141g": Hardware(
        name="h200_141g",
        device_bytes=141 * GB,
        flops=989e12,
        device_to_host_bps=_PCIE5,
        nvlink_bps=450 * GB,
        network_bps=50 * GB,
        host_bytes=_DGX_DRAM,
        host_bps=614 * GB,
        nvme_bytes=_NVME_BYTES,
        nvme_read_bps=_NVME_READ,
        nvme_write_bps=_NVME_WRITE,
    ),
}
NAMES = (*KNOWN, "cpu")


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def copy_bandwidth(nbytes: int = 64 * 2**20, runs: int = 3) -> float:
    """Bytes/s of one in-memory copy of ``nbytes`` (best of ``runs``; ~0.1 s at 64 MiB)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_cpu(directory: str = ".") -> Hardware:
    """This machine as one node of one device: device and host are the same memory (MemAvailable),
    their "link" is a memory copy, FLOP/s a short float32 matmul (``metrics.detect_peak_flops``),
    the file tier the free space of ``directory`` (read/write bandwidth not measured: the copy
    bandwidth, an upper bound for a page-cache-backed file). Device and host are one memory here
    but are budgeted separately, each at MemAvailable: set ``hardware.device_bytes`` (and
    ``hardware.host_bytes``) to split it."""
    from longtrain.trainer.metrics import detect_peak_flops

    available = meminfo()["MemAvailable"]
    bandwidth = copy_bandwidth()
    return Hardware(
        name="cpu",
        device_bytes=available,
        flops=detect_peak_flops(torch.device("cpu"), torch.float32),
        device_to_host_bps=bandwidth,
        nvlink_bps=bandwidth,
        network_bps=bandwidth,
        host_bytes=available,
        host_bps=bandwidth,
        nvme_bytes=shutil.disk_usage(directory).free,
        nvme_read_bps=bandwidth,
        nvme_write_bps=bandwidth,
        gpus_per_node=1,
        reserved_bytes=0,
    )


def hardware(name: str, gpus_per_node: int | None = None) -> Hardware:
    """The description called ``name`` (``gpus_per_node`` overrides the node's 8 devices)."""
    if name == "cpu":
        hw = measure_cpu(os.getcwd())
    elif name in KNOWN:
        hw = KNOWN[name]
    else:
        raise ConfigError(f"unknown hardware={name!r}; known: {', '.join(NAMES)}")
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise ConfigError(f"gpus per node must be >= 1, got {gpus_per_node}")
        hw = replace(hw, gpus_per_node=gpus_per_node)
    return hw

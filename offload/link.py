"""An emulated device<->host link (``activation.link_gbps``) in front of an activation store.

On a CPU machine the "device" and the host tier are the same RAM, so a copy to the host tier is a
memcpy at tens of GB/s and alpha="auto" always picks 1: the swap/recompute trade-off MEMO is
about (a PCIe link slower than the layer's compute) never shows. ``EmulatedLink`` makes every
write into the store and every read out of it take at least ``bytes / bandwidth``: the real copy
runs, then the calling thread sleeps for the remainder (on the copy engine's threads in training,
so the copy engine's timer and the exposed copy time see it; on the calling thread in
``profile.copy_bandwidth``, so alpha="auto" measures the emulated link). Sleeping releases the GIL,
as a copy on a real link would leave compute running.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from longtrain.config_checks import ConfigError

from .store import ActivationStore


class EmulatedLink:
    """An ``ActivationStore`` whose writes and reads take at least nbytes / ``gbps`` * 1e-9 s."""

    def __init__(self, store: ActivationStore, gbps: float):
        self.store = store
        self.tier = store.tier
        self.gbps = gbps
        self._bytes_per_s = gbps * 1e9

    def _hold(self, nbytes: int, t0: float) -> None:
        remaining = nbytes / self._bytes_per_s - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)

    def write(self, key: tuple, src: Tensor, non_blocking: bool = False) -> None:
        t0 = time.perf_counter()
        self.store.write(key, src, non_blocking)
        self._hold(src.numel() * src.element_size(), t0)

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor:
        t0 = time.perf_counter()
        value = self.store.read(key, device, non_blocking)
        self._hold(value.numel() * value.element_size(), t0)
        return value

    def nbytes(self) -> int:
        return self.store.nbytes()

    def release(self, key: tuple) -> None:
        self.store.release(key)

    def release_all(self) -> None:
        self.store.release_all()

    def close(self) -> None:
        self.store.close()


def emulate_link(store: ActivationStore, gbps: float | None, device: torch.device) -> ActivationStore:
    """``store`` behind an emulated link of ``gbps`` GB/s (``store`` itself for None). Only on a CPU
    device: a CUDA device has a real link, and its copies are issued from the compute thread."""
    if gbps is None:
        return store
    if device.type != "cpu":
        raise ConfigError(
            f"activation.link_gbps emulates a link on a CPU device; on {device.type} the link is real: "
            "set activation.link_gbps=null"
        )
    return EmulatedLink(store, gbps)

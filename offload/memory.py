"""Live bytes on the compute device, measured the same way for every activation-memory system.

    counter = DeviceBytesCounter(device)
    with counter:                 # one training step
        loss = model(...).loss; loss.backward()
    counter.peak_bytes            # peak live device bytes above those live when the step began

On CUDA this is the caching allocator's own count (``torch.cuda.max_memory_allocated``): every
device tensor, the copy engine's rounding buffers included; pinned host buffers are not device
memory and do not appear.

On a CPU device the "device" and the host are the same RAM, so there is no device allocator to
ask. The counter reads glibc's allocator (``mallinfo2``: bytes in use in every thread's arena plus
mmapped chunks) after every aten op of the step (a ``TorchDispatchMode`` on the calling thread,
which also runs the backward of a CPU graph), and subtracts the bytes of host-tier buffers, which
the activation stores register in ``HOST_BUFFERS`` when they allocate them. Everything else the
process holds counts: tensors made by the copy threads (a file-tier read, prefetched a layer
early), originals kept alive until their copy lands, and, for ``save_on_cpu``, the "host" copies,
which on a CPU device are the original tensors (``.cpu()`` of a CPU tensor copies nothing). The
peak is sampled at op boundaries, so scratch memory freed inside one kernel is not seen, for any
system alike. Measuring slows the step (a Python call per op): time a step without the counter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


def _aligned_total(nbytes: int, align: int) -> int:
    return nbytes + (align if align > 1 else 0)


def aligned_empty(nbytes: int, *, align: int = 1, pin: bool = False) -> Tensor:
    """An (unregistered) uint8 tensor of ``nbytes`` whose first byte is ``align``-aligned: a view into
    an allocation ``align`` bytes larger."""
    raw = torch.empty(_aligned_total(nbytes, align), dtype=torch.uint8, pin_memory=pin)
    start = -raw.data_ptr() % align if align > 1 else 0
    return raw[start : start + nbytes]


class HostBuffers:
    """Host-tier buffers of this process: bytes that are not device memory even when the device is the
    CPU. The activation stores allocate theirs through ``host_empty``; a buffer leaves the count when
    its tensor is garbage collected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0

    def _add(self, nbytes: int) -> None:
        with self._lock:
            self._bytes += nbytes

    def allocate(self, nbytes: int, pin: bool = False, align: int = 1) -> Tensor:
        """A uint8 buffer of ``nbytes`` (first byte ``align``-aligned). It is counted before the
        allocation, so a sample taken between the two never sees it as device bytes, and until its
        storage is freed (a view keeps its base's storage alive)."""
        total = _aligned_total(nbytes, align)
        self._add(total)
        try:
            buffer = aligned_empty(nbytes, align=align, pin=pin)
        except BaseException:
            self._add(-total)
            raise
        # storage objects live as long as their memory
        weakref.finalize(buffer.untyped_storage(), self._add, -total)
        return buffer

    def lend(self, buffer: Tensor) -> Tensor:
        """``buffer`` handed to compute in place (a CPU device reading its host tier): the returned
        tensor counts as device memory until it is garbage collected, as a device copy would."""
        view = buffer.detach()  # a tensor object of its own on the same memory
        nbytes = view.numel() * view.element_size()
        self._add(-nbytes)
        weakref.finalize(view, self._add, nbytes)
        return view

    def nbytes(self) -> int:
        return self._bytes


# One per process, like the allocator whose bytes it qualifies.
HOST_BUFFERS = HostBuffers()


def host_empty(nbytes: int, *, pin: bool = False, align: int = 1) -> Tensor:
    """A registered uint8 host buffer (see ``HostBuffers.allocate``)."""
    return HOST_BUFFERS.allocate(nbytes, pin, align)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_bytes_in_use() -> int:
    """Bytes glibc has handed out and not taken back (arena chunks in use + mmapped chunks)."""
    if _MALLINFO2 is None:
        raise RuntimeError("measuring CPU device bytes needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class _Sampler(TorchDispatchMode):
    def __init__(self, counter: DeviceBytesCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.counter.sample()  # the op's outputs exist and its inputs are still referenced
        return out


class DeviceBytesCounter:
    """Peak live device bytes during a ``with`` block, above the bytes live when it was entered."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.base_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self._mode: _Sampler | None = None

    def live_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return heap_bytes_in_use() - HOST_BUFFERS.nbytes()

    def sample(self) -> None:
        self.samples += 1
        self.peak_bytes = max(self.peak_bytes, self.live_bytes() - self.base_bytes)

    def __enter__(self) -> DeviceBytesCounter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base_bytes, self.peak_bytes, self.samples = self.live_bytes(), 0, 0
        if self.device.type != "cuda":
            self._mode = _Sampler(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
            self.peak_bytes = max(self.peak_bytes, peak)
        else:
            self.sample()

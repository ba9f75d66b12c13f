"""Asynchronous copies between the device and an activation store.

Two queues, like two CUDA streams: ``d2h`` (device -> store, during forward) and ``h2d``
(store -> device, prefetch during backward). Each submitted copy returns a ``Copy`` handle that
is waited on before its data is used (an event).

* ``ThreadCopyEngine`` (CPU, and any device): one worker thread per queue. torch copies, file
  reads and writes release the GIL, so copies overlap compute on another core.
* ``CudaCopyEngine``: side streams with events; pinned host buffers come from the store and are
  allocated once and reused. The source tensor is first staged into one of two device "rounding
  buffers" that alternate between layers, so the device memory held for pending copies is bounded
  by two layer buffers and the originals are freed at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .store import ActivationStore


class Copy:
    """Handle of one asynchronous copy: ``wait()`` blocks until it finished and returns its result."""

    def __init__(self, future: Future | None = None, value: Tensor | None = None, event=None):
        self._future, self._value, self._event = future, value, event

    def wait(self) -> Tensor | None:
        if self._future is not None:
            self._value = self._future.result()  # re-raises a failed read/write here
            self._future = None
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None
        return self._value

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event is None or self._event.query()


class CopyTimer:
    """Accumulates time spent copying (worker side) and time the compute thread waited (exposed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.copy_s = 0.0
        self.exposed_s = 0.0

    def add_copy(self, seconds: float) -> None:
        with self._lock:
            self.copy_s += seconds

    def reset(self) -> None:
        self.copy_s = self.exposed_s = 0.0

    def wait(self, copy: Copy) -> Tensor | None:
        """Wait for ``copy`` on the compute thread; the time spent is the copy time left exposed."""
        t0 = time.perf_counter()
        value = copy.wait()
        self.exposed_s += time.perf_counter() - t0
        return value


class _EngineBase:
    timer: CopyTimer

    def wait(self, copy: Copy) -> Tensor | None:
        return self.timer.wait(copy)


class ThreadCopyEngine(_EngineBase):
    """Copies on two worker threads (the CPU implementation of the two copy streams)."""

    def __init__(self, store: ActivationStore, device: torch.device):
        self.store, self.device = store, device
        self._d2h = ThreadPoolExecutor(1, thread_name_prefix="longtrain-d2h")
        self._h2d = ThreadPoolExecutor(1, thread_name_prefix="longtrain-h2d")
        self.timer = CopyTimer()

    def _timed(self, fn: Callable[[], Tensor | None]) -> Callable[[], Tensor | None]:
        def run():
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.timer.add_copy(time.perf_counter() - t0)

        return run

    def offload(self, key: tuple, src: Tensor, layer: int) -> Copy:
        """Copy ``src`` into the store under ``key``; ``src`` stays referenced until the copy is done."""
        return Copy(self._d2h.submit(self._timed(lambda: self.store.write(key, src))))

    def fetch(self, key: tuple) -> Copy:
        """Read ``key`` back to the device asynchronously."""
        return Copy(self._h2d.submit(self._timed(lambda: self.store.read(key, self.device))))

    def close(self) -> None:
        self._d2h.shutdown(wait=True)
        self._h2d.shutdown(wait=True)


class CudaCopyEngine(_EngineBase):
    """Side streams + events; two device rounding buffers alternate between layers."""

    def __init__(self, store: ActivationStore, device: torch.device):
        self.store, self.device = store, device
        self._d2h_stream = torch.cuda.Stream(device)
        self._h2d_stream = torch.cuda.Stream(device)
        self._buffers: list[Tensor | None] = [None, None]  # uint8 rounding buffers, by layer parity
        self._offsets = [0, 0]
        self._layer_of_buffer = [-1, -1]
        self.timer = CopyTimer()

    def _stage(self, src: Tensor, layer: int) -> Tensor:
        """Copy ``src`` into the rounding buffer of ``layer``'s parity (grown between steps if short)."""
        slot = layer % 2
        if self._layer_of_buffer[slot] != layer:
            self._layer_of_buffer[slot], self._offsets[slot] = layer, 0
        nbytes = src.numel() * src.element_size()
        buf, off = self._buffers[slot], self._offsets[slot]
        aligned = (off + 511) // 512 * 512
        if buf is None or aligned + nbytes > buf.numel():
            # first step (or a larger layer): grow this buffer; later steps reuse it.
            need = max(aligned + nbytes, 0 if buf is None else buf.numel() * 2)
            self._buffers[slot] = buf = torch.empty(need, dtype=torch.uint8, device=self.device)
            aligned = 0
        view = buf[aligned : aligned + nbytes].view(src.dtype).view(src.shape)
        view.copy_(src)
        view.record_stream(self._d2h_stream)  # the buffer may be regrown while this copy is pending
        self._offsets[slot] = aligned + nbytes
        return view

    def offload(self, key: tuple, src: Tensor, layer: int) -> Copy:
        staged = self._stage(src.contiguous(), layer)
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self._d2h_stream):
            self._d2h_stream.wait_event(ready)
            self.store.write(key, staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._d2h_stream)
        return Copy(event=done)

    def fetch(self, key: tuple) -> Copy:
        with torch.cuda.stream(self._h2d_stream):
            value = self.store.read(key, self.device, non_blocking=True)
            value.record_stream(torch.cuda.current_stream(self.device))
            done = torch.cuda.Event()
            done.record(self._h2d_stream)
        return Copy(value=value, event=done)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)


def build_copy_engine(store: ActivationStore, device: torch.device):
    if device.type == "cuda":
        return CudaCopyEngine(store, device)
    return ThreadCopyEngine(store, device)

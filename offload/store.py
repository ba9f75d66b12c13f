"""Where offloaded activations live between forward and backward: host memory or a file.

Both stores keep one region per key (layer, slot) and reuse it every step, so steady-state
steps allocate nothing (on CUDA the host buffers are pinned once: pinned allocation is slow).
Host buffers are registered in ``memory.HOST_BUFFERS``, so a device-bytes count can tell them from
device memory when the device is the CPU.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from longtrain.config_checks import ConfigError

from .direct_io import (
    ALIGN,
    aligned_buffer,
    bytes_of,
    check_dir,
    open_direct,
    padded,
    pread_exact,
    pwrite_exact,
)
from .memory import HOST_BUFFERS, aligned_empty, host_empty

# Writes go through a bounce buffer of BOUNCE_BYTES (a multiple of ALIGN, so every chunk but the
# last is whole blocks). File regions start on ALIGN boundaries (direct_io.py has the O_DIRECT rules).
BOUNCE_BYTES = 8 * 2**20


class ActivationStore(Protocol):
    tier: str

    def write(self, key: tuple, src: Tensor, non_blocking: bool = False) -> None: ...

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor: ...

    def nbytes(self) -> int:
        """Bytes of the keys written and not released."""
        ...

    def release(self, key: tuple) -> None:
        """Forget ``key`` and drop the memory it holds."""
        ...

    def release_all(self) -> None:
        """Forget every key; the regions stay allocated for the next step's writes."""
        ...

    def close(self) -> None: ...


class HostStore:
    """DRAM buffers (pinned when the source lives on CUDA), one per key, reused across steps."""

    tier = "host"

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._live: set[tuple] = set()

    def write(self, key: tuple, src: Tensor, non_blocking: bool = False) -> None:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            nbytes = src.numel() * src.element_size()
            buf = host_empty(nbytes, pin=src.is_cuda).view(src.dtype).view(src.shape)
            self._buffers[key] = buf
        if src.is_cuda or not src.is_contiguous():
            buf.copy_(src, non_blocking=non_blocking)
        else:
            # CPU to CPU on the copy thread: one plain memcpy (numpy releases the GIL). ``Tensor.copy_``
            # would start a second OpenMP team there, whose threads fight the compute threads for the
            # same cores.
            np.copyto(bytes_of(buf), bytes_of(src))
        self._live.add(key)

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor:
        if key not in self._live:
            raise RuntimeError(f"activation {key} was never offloaded (or was already released)")
        buf = self._buffers[key]
        if device.type != "cpu":
            return buf.to(device, non_blocking=non_blocking)
        # A CPU device reads the buffer in place (no copy); while compute holds it, it counts as device
        # memory, as the device copy a GPU would make.
        return HOST_BUFFERS.lend(buf)

    def nbytes(self) -> int:
        return sum(self._buffers[k].numel() * self._buffers[k].element_size() for k in self._live)

    def release(self, key: tuple) -> None:
        self._live.discard(key)
        self._buffers.pop(key, None)

    def release_all(self) -> None:
        self._live.clear()

    def close(self) -> None:
        self._buffers.clear()
        self._live.clear()


class FileStore:
    """A file on local disk (SSD): regions appended on first use and rewritten in place after.

    The file is opened with O_DIRECT, so its bytes bypass the page cache: what the file tier frees
    really leaves memory (the kernel does not keep it as cached pages), and its copy times include
    the disk. Every region starts on a 4 KiB boundary and is written padded to a multiple of 4 KiB
    through one aligned bounce buffer; a read lands directly in an aligned tensor. Where the
    filesystem refuses O_DIRECT (tmpfs, some network filesystems), the store warns and writes through
    the page cache, whose pages then hold the tier's bytes (``direct`` is False).
    """

    tier = "file"

    def __init__(self, directory: str | Path, direct: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A fresh file per store: two stores of one process in one directory (two models, or a
        # re-applied executor) must never write into each other's regions.
        self._fd, name = tempfile.mkstemp(prefix=f"activations-{os.getpid()}-", suffix=".bin", dir=self.dir)
        self.path = Path(name)
        self.direct = False
        if direct:
            os.close(self._fd)
            self._fd, self.direct, refusal = open_direct(self.path, os.O_RDWR)
            if refusal is not None:
                warnings.warn(
                    f"activation.file_dir {str(self.dir)!r} refuses O_DIRECT ({refusal.strerror}): the file tier "
                    "writes through the page cache, which holds its bytes in memory; point activation.file_dir "
                    "at a local disk",
                    stacklevel=2,
                )
        self._what = f"the activation file {self.path}"
        self._regions: dict[tuple, tuple[int, torch.Size, torch.dtype]] = {}
        self._end = 0
        self._live: set[tuple] = set()
        self._bounce: Tensor | None = None  # writes (the d2h queue); allocated on the first write
        self._read_bounce: Tensor | None = None  # reads to a CUDA device (the h2d queue)

    def _bounce_for(self, attr: str, pin: bool) -> Tensor:
        buf = getattr(self, attr)
        if buf is None:
            buf = aligned_buffer(BOUNCE_BYTES, pin=pin)
            setattr(self, attr, buf)
        return buf

    def write(self, key: tuple, src: Tensor, non_blocking: bool = False) -> None:
        flat = src.detach().contiguous().view(torch.uint8).reshape(-1)
        nbytes = flat.numel()
        region = self._regions.get(key)
        if region is None or region[1] != src.shape or region[2] != src.dtype:
            region = (self._end, src.shape, src.dtype)
            self._end += padded(nbytes)
            self._regions[key] = region
        if not self.direct:
            self._pwrite(bytes_of(flat.cpu()), region[0])
        else:
            bounce = self._bounce_for("_bounce", pin=src.is_cuda)
            for pos in range(0, nbytes, BOUNCE_BYTES):
                n = min(BOUNCE_BYTES, nbytes - pos)
                if flat.is_cuda:
                    bounce[:n].copy_(flat[pos : pos + n])
                else:  # one memcpy, no OpenMP team on the copy thread (see HostStore.write)
                    np.copyto(bytes_of(bounce[:n]), bytes_of(flat[pos : pos + n]))
                # the pad bytes land in this region's own padding
                self._pwrite(bytes_of(bounce[: padded(n)]), region[0] + pos)
        self._live.add(key)

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        hint = "; is activation.file_dir out of space?"
        pwrite_exact(self._fd, data, offset, self._what, direct=self.direct, hint=hint)

    def _pread(self, data: np.ndarray, offset: int) -> None:
        pread_exact(self._fd, data, offset, self._what, direct=self.direct)

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor:
        if key not in self._live:
            raise RuntimeError(f"activation {key} was never offloaded (or was already released)")
        offset, shape, dtype = self._regions[key]
        nbytes = shape.numel() * dtype.itemsize
        if not self.direct:
            out = torch.empty(shape, dtype=dtype)
            self._pread(bytes_of(out), offset)
            return out if device.type == "cpu" else out.to(device, non_blocking=non_blocking)
        if device.type == "cpu":  # straight into the tensor compute will use
            # device memory on a CPU device: not a registered host buffer
            raw = aligned_empty(padded(nbytes), align=ALIGN)
            self._pread(bytes_of(raw), offset)
            return raw[:nbytes].view(dtype).view(shape)
        out_flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        bounce = self._bounce_for("_read_bounce", pin=True)
        for pos in range(0, nbytes, BOUNCE_BYTES):
            n = min(BOUNCE_BYTES, nbytes - pos)
            self._pread(bytes_of(bounce[: padded(n)]), offset + pos)
            out_flat[pos : pos + n].copy_(bounce[:n])  # synchronous: the bounce buffer is reused
        return out_flat.view(dtype).view(shape)

    def nbytes(self) -> int:
        total = 0
        for key in self._live:
            _, shape, dtype = self._regions[key]
            total += shape.numel() * dtype.itemsize
        return total

    def release(self, key: tuple) -> None:
        """Forget ``key``; its region leaves the file when it is the last one (else it stays unused)."""
        self._live.discard(key)
        region = self._regions.pop(key, None)
        if region is not None and region[0] + padded(region[1].numel() * region[2].itemsize) == self._end:
            self._end = region[0]
            os.ftruncate(self._fd, self._end)

    def release_all(self) -> None:
        self._live.clear()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


def check_file_dir(directory: str | Path, need_bytes: int = 0) -> Path:
    """Fail before training if the file tier's directory is not writable or lacks space."""
    return check_dir(directory, "activation.file_dir", need_bytes, remedy=" or lower activation.alpha")


def build_store(tier: str, file_dir: str | None) -> HostStore | FileStore:
    if tier == "file":
        if not file_dir:
            raise ConfigError("activation.tier=file needs activation.file_dir")
        return FileStore(check_file_dir(file_dir))
    return HostStore()

"""Where offloaded activations live between forward and backward: host memory or a file.

Both stores keep one region per key (layer, slot) and reuse it every step, so steady-state
steps allocate nothing (on CUDA the host buffers are pinned once: pinned allocation is slow).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch
from torch import Tensor

from longtrain.config_checks import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Buffer


def _padded(nbytes: int) -> int:
    """File regions start on 4 KiB boundaries."""
    return (nbytes + 4095) // 4096 * 4096


def _bytes_of(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 array (no copy; any dtype, bfloat16 too)."""
    return t.view(torch.uint8).reshape(-1).numpy()


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
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            self._buffers[key] = buf
        if src.is_cuda or not src.is_contiguous():
            buf.copy_(src, non_blocking=non_blocking)
        else:
            # CPU to CPU on the copy thread: one plain memcpy (numpy releases the GIL). ``Tensor.copy_``
            # would start a second OpenMP team there, whose threads fight the compute threads for the
            # same cores.
            np.copyto(_bytes_of(buf), _bytes_of(src))
        self._live.add(key)

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor:
        if key not in self._live:
            raise RuntimeError(f"activation {key} was never offloaded (or was already released)")
        buf = self._buffers[key]
        return buf if device.type == "cpu" else buf.to(device, non_blocking=non_blocking)

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

    Written pages sit in the page cache, which the kernel may drop; they do not count toward the
    process's resident memory, so this tier really lowers RSS on a CPU machine.
    """

    tier = "file"

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A fresh file per store: two stores of one process in one directory (two models, or a
        # re-applied executor) must never write into each other's regions.
        self._fd, name = tempfile.mkstemp(prefix=f"activations-{os.getpid()}-", suffix=".bin", dir=self.dir)
        self.path = Path(name)
        self._regions: dict[tuple, tuple[int, torch.Size, torch.dtype]] = {}
        self._end = 0
        self._live: set[tuple] = set()

    def write(self, key: tuple, src: Tensor, non_blocking: bool = False) -> None:
        data = _bytes_of(src.detach().contiguous().cpu())
        region = self._regions.get(key)
        if region is None or region[1] != src.shape or region[2] != src.dtype:
            region = (self._end, src.shape, src.dtype)
            self._end += _padded(data.nbytes)
            self._regions[key] = region
        # an ndarray is a buffer; numpy's stubs declare __buffer__ only for Python >= 3.12
        written = os.pwrite(self._fd, cast("Buffer", data), region[0])
        if written != data.nbytes:
            raise OSError(
                f"short write to the activation file {self.path} ({written} of {data.nbytes} bytes); "
                "is activation.file_dir out of space?"
            )
        self._live.add(key)

    def read(self, key: tuple, device: torch.device, non_blocking: bool = False) -> Tensor:
        if key not in self._live:
            raise RuntimeError(f"activation {key} was never offloaded (or was already released)")
        offset, shape, dtype = self._regions[key]
        out = torch.empty(shape, dtype=dtype)
        buf = _bytes_of(out)
        got = os.preadv(self._fd, [cast("Buffer", buf)], offset)  # see write
        if got != buf.nbytes:
            raise OSError(f"short read from the activation file {self.path} ({got} of {buf.nbytes} bytes)")
        return out if device.type == "cpu" else out.to(device, non_blocking=non_blocking)

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
        if region is not None and region[0] + _padded(region[1].numel() * region[2].itemsize) == self._end:
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
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".longtrain-write-test"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"activation.file_dir {str(path)!r} is not writable ({e.strerror}); set activation.file_dir"
        ) from None
    free = shutil.disk_usage(path).free
    if need_bytes > free:
        raise ConfigError(
            f"activation.file_dir {str(path)!r} has {free / 2**30:.1f} GiB free but the file tier needs "
            f"{need_bytes / 2**30:.1f} GiB; point activation.file_dir at a larger disk or lower activation.alpha"
        )
    return path


def build_store(tier: str, file_dir: str | None) -> HostStore | FileStore:
    if tier == "file":
        if not file_dir:
            raise ConfigError("activation.tier=file needs activation.file_dir")
        return FileStore(check_file_dir(file_dir))
    return HostStore()

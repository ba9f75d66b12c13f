"""Aligned file I/O that bypasses the page cache (O_DIRECT), shared by the activation file tier
(``store.FileStore``) and the optimizer's NVMe tier (``optim/tiers.py``).

O_DIRECT transfers need the buffer address, the file offset and the length to be multiples of the
disk's logical block size; ``ALIGN`` = 4 KiB covers every current disk. So:

- buffers come from ``aligned_buffer`` (registered host memory, first byte on an ALIGN boundary,
  length rounded up with ``padded``);
- a direct write is always whole padded blocks: an unaligned one is refused before it reaches the
  kernel (DeepSpeed's AIO silently truncates a write whose size is not a multiple of 512 and still
  reports success; here nothing is trusted that was not checked);
- ``pwrite_exact`` / ``pread_exact`` raise ``OSError`` on a short transfer (a full disk, a file
  truncated underneath), never returning with fewer bytes than asked.

Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems) ``open_direct`` opens the
file without it and returns the refusal, so the caller can warn naming its own config key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor

from longtrain.config_checks import ConfigError

from .memory import host_empty

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "ALIGN",
    "aligned_buffer",
    "bytes_of",
    "check_dir",
    "open_direct",
    "padded",
    "pread_exact",
    "pwrite_exact",
]

ALIGN = 4096


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ALIGN."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def bytes_of(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 array (no copy; any dtype, bfloat16 too)."""
    return t.view(torch.uint8).reshape(-1).numpy()


def aligned_buffer(nbytes: int, *, pin: bool = False) -> Tensor:
    """A registered host buffer (uint8) of ``padded(nbytes)`` bytes whose first byte is ALIGN-aligned
    (pinned when ``pin``: the source or destination of the copies lives on CUDA)."""
    return host_empty(padded(nbytes), pin=pin, align=ALIGN)


def open_direct(path: str | Path, flags: int) -> tuple[int, bool, OSError | None]:
    """``(fd, direct, refusal)``: ``path`` opened with ``flags | O_DIRECT``, or, where the filesystem
    refuses O_DIRECT, without it and with the refusal (on platforms without O_DIRECT: without it,
    no refusal)."""
    o_direct = getattr(os, "O_DIRECT", 0)
    if not o_direct:
        return os.open(path, flags), False, None
    try:
        return os.open(path, flags | o_direct), True, None
    except OSError as e:
        return os.open(path, flags), False, e


def _check_aligned(data: np.ndarray, offset: int, what: str) -> None:
    if offset % ALIGN or data.nbytes % ALIGN or data.ctypes.data % ALIGN:
        raise ValueError(
            f"unaligned O_DIRECT transfer on {what}: offset {offset}, {data.nbytes} bytes at address "
            f"{data.ctypes.data:#x} (each must be a multiple of {ALIGN})"
        )


def pwrite_exact(fd: int, data: np.ndarray, offset: int, what: str, *, direct: bool, hint: str = "") -> None:
    """Write all of ``data`` at ``offset`` (whole ALIGN blocks when ``direct``), else raise."""
    if direct:
        _check_aligned(data, offset, what)
    # an ndarray is a buffer; numpy's stubs declare __buffer__ only for Python >= 3.12
    written = os.pwrite(fd, cast("Buffer", data), offset)
    if written != data.nbytes:
        raise OSError(f"short write to {what} ({written} of {data.nbytes} bytes){hint}")


def pread_exact(fd: int, data: np.ndarray, offset: int, what: str, *, direct: bool) -> None:
    """Fill all of ``data`` from ``offset`` (whole ALIGN blocks when ``direct``), else raise."""
    if direct:
        _check_aligned(data, offset, what)
    got = os.preadv(fd, [cast("Buffer", data)], offset)  # see pwrite_exact
    if got != data.nbytes:
        raise OSError(f"short read from {what} ({got} of {data.nbytes} bytes)")


def check_dir(directory: str | Path, key: str, need_bytes: int = 0, remedy: str = "") -> Path:
    """``directory`` created if needed, writable and with ``need_bytes`` free, else a ConfigError
    naming ``key`` (the config key that set it); ``remedy`` is appended to the no-space message."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".longtrain-write-test-{os.getpid()}"  # ranks may share the directory
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key} {str(path)!r} is not writable ({e.strerror}); set {key}") from None
    free = shutil.disk_usage(path).free
    if need_bytes > free:
        raise ConfigError(
            f"{key} {str(path)!r} has {free / 2**30:.1f} GiB free but needs {need_bytes / 2**30:.1f} GiB; "
            f"point {key} at a larger disk{remedy}"
        )
    return path

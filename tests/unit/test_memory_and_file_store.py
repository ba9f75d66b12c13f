"""The device-bytes counter the activation benchmark uses for every system, and the O_DIRECT file tier.

The counter is an allocator-level count (glibc's bytes in use, sampled after every op) minus the
host-tier buffers the stores register; these tests pin what it sees: a tensor made inside the
block, one made on another thread, and not a registered host buffer. The file tier must return
the bytes it was given, for sizes that are not multiples of the O_DIRECT block and tensors larger
than its bounce buffer, and fail loudly on a short write.
"""

from __future__ import annotations

import fcntl
import gc
import os
import threading

import pytest
import torch

from longtrain.offload import memory, store
from longtrain.offload.memory import HOST_BUFFERS, DeviceBytesCounter, host_empty

MiB = 2**20

needs_mallinfo = pytest.mark.skipif(memory._MALLINFO2 is None, reason="needs glibc mallinfo2")
# The count is process-wide: another thread (left by an earlier test, e.g. a progress bar's monitor)
# may free a few KiB inside a counted block, so expected sizes are met within this slack.
SLACK = 64 * 2**10


@pytest.fixture(autouse=True)
def _warm_dispatch():
    """The first op under a dispatch mode in a process allocates ~24 MiB once (torch's lazy set-up).
    Garbage left by earlier tests is collected first: freed inside a counted block, it would lower
    the live bytes below the block's starting point and hide what the test allocates."""
    gc.collect()
    if memory._MALLINFO2 is not None:
        with DeviceBytesCounter("cpu"):
            torch.ones(4)


@needs_mallinfo
def test_counter_sees_a_tensor_made_in_the_block():
    with DeviceBytesCounter("cpu") as counter:
        x = torch.ones(8 * MiB // 4)  # 8 MiB, one op
        del x
        y = torch.zeros(2 * MiB // 4)
    assert 8 * MiB - SLACK <= counter.peak_bytes < 8 * MiB + MiB  # the 8 MiB peak, not the 2 MiB left
    assert counter.samples >= 2
    del y


@needs_mallinfo
def test_counter_sees_memory_allocated_by_another_thread():
    """A copy thread's allocation (a prefetched file-tier read) is device memory on a CPU device."""
    held = []
    with DeviceBytesCounter("cpu") as counter:
        t = threading.Thread(target=lambda: held.append(torch.empty(16 * MiB, dtype=torch.uint8).fill_(1)))
        t.start()
        t.join()
        torch.ones(4)  # any op on the compute thread samples
    assert counter.peak_bytes >= 16 * MiB - SLACK
    held.clear()


@needs_mallinfo
def test_counter_excludes_registered_host_buffers():
    before = HOST_BUFFERS.nbytes()
    with DeviceBytesCounter("cpu") as counter:
        buf = host_empty(32 * MiB)
        torch.ones(4)
    assert HOST_BUFFERS.nbytes() - before >= 32 * MiB
    assert counter.peak_bytes < MiB
    del buf
    assert HOST_BUFFERS.nbytes() == before  # the registration ends with the buffer


def test_aligned_host_buffer():
    buf = host_empty(5000, align=4096)
    assert buf.numel() == 5000 and buf.data_ptr() % 4096 == 0


@pytest.mark.parametrize("numel", [1, 127, 1000, 4096, 300_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_file_store_round_trips_odd_sizes(tmp_path, monkeypatch, numel, dtype):
    monkeypatch.setattr(store, "BOUNCE_BYTES", 8192)  # several bounce rounds for the larger tensors
    fs = store.FileStore(tmp_path)
    try:
        assert fs.direct
        assert fcntl.fcntl(fs._fd, fcntl.F_GETFL) & os.O_DIRECT
        gen = torch.Generator().manual_seed(numel)
        a = torch.randn(numel, generator=gen).to(dtype)
        b = torch.randn(numel + 3, generator=gen).to(dtype)
        fs.write(("a",), a)
        fs.write(("b",), b[1:])  # a view at a storage offset
        fs.write(("a",), a * 2)  # rewritten in place
        got_a, got_b = fs.read(("a",), torch.device("cpu")), fs.read(("b",), torch.device("cpu"))
        assert torch.equal(got_a, a * 2) and torch.equal(got_b, b[1:])
        assert got_a.data_ptr() % store.ALIGN == 0
        assert os.path.getsize(fs.path) % store.ALIGN == 0
    finally:
        fs.close()


def test_file_store_short_write_raises(tmp_path, monkeypatch):
    fs = store.FileStore(tmp_path)
    monkeypatch.setattr(store.os, "pwrite", lambda fd, data, offset: 512)
    with pytest.raises(OSError, match="short write"):
        fs.write(("x",), torch.ones(4096))
    fs.close()


def test_file_store_short_read_raises(tmp_path):
    fs = store.FileStore(tmp_path)
    fs.write(("x",), torch.ones(3000))
    os.truncate(fs.path, 4096)  # the region was 12 KiB
    with pytest.raises(OSError, match="short read"):
        fs.read(("x",), torch.device("cpu"))
    fs.close()


def test_file_store_without_o_direct_warns_and_still_round_trips(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(store.os, "open", refuse_direct)
    with pytest.warns(UserWarning, match="activation.file_dir .* refuses O_DIRECT"):
        fs = store.FileStore(tmp_path)
    assert not fs.direct
    x = torch.arange(1001, dtype=torch.float64)
    fs.write(("x",), x)
    assert torch.equal(fs.read(("x",), torch.device("cpu")), x)
    fs.close()


@needs_mallinfo
def test_counter_counts_a_host_buffer_lent_to_compute():
    """A CPU device reads its host tier in place: while compute holds the buffer it is device memory
    (a GPU would hold a device copy), and it is host memory again once compute drops it."""
    hs = store.HostStore()
    hs.write(("x",), torch.ones(4 * MiB // 4))
    with DeviceBytesCounter("cpu") as held:
        lent = hs.read(("x",), torch.device("cpu"))
        lent.sum()
    assert held.peak_bytes >= 4 * MiB - SLACK
    del lent
    with DeviceBytesCounter("cpu") as dropped:
        torch.ones(4)
    assert dropped.peak_bytes < MiB and dropped.base_bytes < held.base_bytes + 4 * MiB
    hs.close()

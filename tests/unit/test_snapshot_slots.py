"""Snapshot slots (checkpoint/slots.py): round trip, alternation, a reader never takes a
half-written or corrupted slot for a whole one, private permissions."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import longtrain
from longtrain.checkpoint.slots import (
    COMPLETE,
    WRITING,
    SlotPair,
    SlotTooSmall,
    create_slot_file,
    private_dir,
    required_bytes,
)

# not resolved: the package may be a symlink whose target has another name
PACKAGE_PARENT = str(Path(longtrain.__file__).parent.parent)


def state(fill: float) -> dict[str, torch.Tensor]:
    """Tensors of every kind a training state holds: several dtypes, 0-d, empty, non-contiguous."""
    return {
        "w": torch.full((7, 5), fill, dtype=torch.float32),
        "w_t": torch.full((5, 7), fill, dtype=torch.float64).t(),  # non-contiguous
        "half": torch.full((3,), fill, dtype=torch.bfloat16),
        "step": torch.tensor(fill, dtype=torch.float32),  # 0-d, as Adam's step
        "empty": torch.zeros(0, 4),
        "rng": torch.Generator().manual_seed(7).get_state(),  # uint8, the same in every process
        "mask": torch.arange(9) % 2 == 0,
    }


def make_pair(root: Path, size: int | None = None) -> SlotPair:
    d = private_dir(root / "slots")
    size = size or required_bytes(state(0.0), {"data": {"consumed": 10**6}})
    paths = (d / "slot0", d / "slot1")
    for p in paths:
        create_slot_file(p, size)
    return SlotPair(paths)


def assert_snapshot(pair: SlotPair, seq: int, fill: float) -> None:
    snap, _ = pair.read_newest()
    assert snap is not None and snap.seq == seq and snap.meta == {"data": {"consumed": seq}}
    expected = state(fill)
    assert snap.tensors.keys() == expected.keys()
    for name, t in expected.items():
        got = snap.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_round_trip_and_alternation(tmp_path):
    pair = make_pair(tmp_path)
    assert pair.read_newest() == (None, [])
    for seq in (1, 2, 3):
        assert pair.write(seq * 10, state(float(seq)), {"data": {"consumed": seq}}) == seq
        assert_snapshot(pair, seq, float(seq))
    seqs = sorted(s.header()[1] for s in pair.slots)
    assert seqs == [2, 3]  # the older slot still holds the previous snapshot
    pair.close()


def test_files_are_private(tmp_path):
    pair = make_pair(tmp_path)
    assert stat.S_IMODE((tmp_path / "slots").stat().st_mode) == 0o700
    for s in pair.slots:
        assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
    pair.close()
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        private_dir(open_dir)


def test_write_interrupted_after_any_tensor_leaves_the_previous_snapshot(tmp_path):
    pair = make_pair(tmp_path)
    pair.write(1, state(1.0), {"data": {"consumed": 1}})
    pair.write(2, state(2.0), {"data": {"consumed": 2}})

    class Crash(Exception):
        pass

    def crash_at(n):
        def hook(i):
            if i == n:
                raise Crash

        return hook

    for n in range(len(state(0.0))):
        with pytest.raises(Crash):
            pair.write(3, state(3.0), {"data": {"consumed": 3}}, after_tensor=crash_at(n))
        assert_snapshot(pair, 2, 2.0)
        assert sorted(s.header()[0] for s in pair.slots) == [WRITING, COMPLETE]
    pair.write(3, state(3.0), {"data": {"consumed": 3}})  # the torn slot is the one reused
    assert_snapshot(pair, 3, 3.0)
    pair.close()


def test_writer_killed_mid_write_leaves_the_previous_snapshot(tmp_path):
    """A separate process writes snapshot 1, starts snapshot 2 and is killed -9 halfway."""
    pair = make_pair(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_snapshot_slots import state
        from longtrain.checkpoint.slots import SlotPair
        from pathlib import Path
        d = Path({str(tmp_path / "slots")!r})
        pair = SlotPair((d / "slot0", d / "slot1"))
        pair.write(1, state(1.0), {{"data": {{"consumed": 1}}}})
        def hang(i):
            if i == 3:
                print("mid", flush=True)
                time.sleep(60)
        pair.write(2, state(2.0), {{"data": {{"consumed": 2}}}}, after_tensor=hang)
        """
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "mid"
        states = sorted(s.header()[0] for s in pair.slots)
        assert states == [WRITING, COMPLETE]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert_snapshot(pair, 1, 1.0)
    pair.close()


@pytest.mark.parametrize("where", ["tensor", "table"])
def test_any_flipped_bit_is_detected_and_the_older_snapshot_used(tmp_path, where):
    pair = make_pair(tmp_path)
    pair.write(1, state(1.0), {"data": {"consumed": 1}})
    pair.write(2, state(2.0), {"data": {"consumed": 2}})
    newest = max(pair.slots, key=lambda s: s.header()[1])
    _, _, _, t_off, t_len, _, d_off, d_len = newest.header()
    lo, n = (d_off, d_len) if where == "tensor" else (t_off, t_len)
    g = torch.Generator().manual_seed(0)
    for byte in torch.randint(lo, lo + n, (20,), generator=g).tolist():
        bit = 1 << (byte % 8)
        newest.buf[byte] ^= bit
        snap, skipped = pair.read_newest()
        newest.buf[byte] ^= bit
        if where == "tensor" and snap is not None and snap.seq == 2:
            continue  # the byte was alignment padding between tensors: no tensor changed
        assert snap is not None and snap.seq == 1, byte
        assert len(skipped) == 1 and "crc32" in skipped[0], skipped
    assert_snapshot(pair, 2, 2.0)
    pair.close()


def test_a_slot_rewritten_while_being_read_is_not_returned(tmp_path):
    """A reader copies the newest slot while the writer laps it (two more snapshots, the second
    into that slot): the read is refused as overwritten, and read_newest retries to the newest."""
    pair = make_pair(tmp_path)
    reader = SlotPair(tuple(s.path for s in pair.slots))  # its own mappings, as another process's
    pair.write(1, state(1.0), {"data": {"consumed": 1}})
    pair.write(2, state(2.0), {"data": {"consumed": 2}})
    newest = max(reader.slots, key=lambda s: s.header()[1])

    def writer_laps(i):
        if i == 2:  # the reader holds tensors 0-2 of snapshot 2
            pair.write(3, state(3.0), {"data": {"consumed": 3}})
            pair.write(4, state(4.0), {"data": {"consumed": 4}})

    assert newest.read(after_tensor=writer_laps) == "overwritten while being read"
    assert_snapshot(reader, 4, 4.0)
    reader.close()
    pair.close()


def test_a_snapshot_too_big_is_refused_before_touching_the_slot(tmp_path):
    pair = make_pair(tmp_path, size=4096)
    pair.write(1, {"a": torch.ones(8)}, {})
    with pytest.raises(SlotTooSmall) as e:
        pair.write(2, {"a": torch.ones(4096)}, {})
    assert e.value.required > 4096
    snap, _ = pair.read_newest()
    assert snap is not None and snap.seq == 1 and torch.equal(snap.tensors["a"], torch.ones(8))
    pair.close()

"""Parity across ranks at the snapshot level (checkpoint/rank_parity.py): real slot images of
different sizes, coded across N ranks; every single loss (xor) and every loss of up to m ranks
(rs) gives back the lost images bit-exact, and a rebuilt image written into a fresh slot reads
back as the lost rank's snapshot, checksums and all."""

from __future__ import annotations

import itertools

import pytest
import torch

from longtrain.checkpoint.parity import ErasureCode
from longtrain.checkpoint.rank_parity import RankParity, RebuildError
from longtrain.checkpoint.slots import Slot, SlotPair, create_slot_file, private_dir, required_bytes
from longtrain.config_checks import ConfigError


def rank_state(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {
        "model/w": torch.randn(16 + 5 * rank, 8, generator=g),  # ranks' snapshots differ in size
        "model/b": torch.randn(3, generator=g, dtype=torch.float64),
        "optimizer/step": torch.tensor(float(rank)),
        "rng/torch": g.get_state(),
    }


def write_snapshots(root, world: int) -> list[SlotPair]:
    pairs = []
    for r in range(world):
        d = private_dir(root / f"rank{r}")
        meta = {"step": 6, "data": {"consumed": 100 + r}}
        size = required_bytes(rank_state(r), meta)
        for name in ("slot0", "slot1"):
            create_slot_file(d / name, size)
        pair = SlotPair((d / "slot0", d / "slot1"))
        pair.write(6, rank_state(r), meta)
        pairs.append(pair)
    return pairs


@pytest.mark.parametrize(
    ("ec", "world"), [("xor", 2), ("xor", 3), ("xor", 5), ("rs:2+1", 3), ("rs:2+2", 4), ("rs:3+2", 5)]
)
def test_every_loss_the_code_covers_rebuilds_the_snapshot(tmp_path, ec, world):
    layout = RankParity.build(ErasureCode.parse(ec), world)
    assert layout is not None
    pairs = write_snapshots(tmp_path, world)
    images = [p.holding(6).image() for p in pairs]
    lengths = [i.numel() for i in images]
    size, parity = layout.encode_images(images)
    assert size % 8 == 0 and size * layout.k >= max(lengths)
    for r in range(world):  # m parity shards per rank: m/k of the largest snapshot, no more
        assert sorted(parity[r]) == sorted(g for g, _ in layout.parity_groups(r))
        assert sum(p.numel() for p in parity[r].values()) == layout.m * size
    losses = [c for n in range(1, layout.m + 1) for c in itertools.combinations(range(world), n)]
    for lost in losses:
        rebuilt = layout.rebuild_images(
            [None if r in lost else images[r] for r in range(world)],
            [None if r in lost else parity[r] for r in range(world)],
            lengths,
            size,
        )
        assert sorted(rebuilt) == list(lost)
        for x in lost:
            assert torch.equal(rebuilt[x], images[x]), (ec, lost, x)
    # a rebuilt image in a fresh slot (a new agent's) reads back as that rank's snapshot
    path = tmp_path / "fresh"
    create_slot_file(path, lengths[1] + 4096)
    slot = Slot(path)
    slot.write_image(
        layout.rebuild_images([images[0], None, *images[2:]], [parity[0], None, *parity[2:]], lengths, size)[
            1
        ]
    )
    got = slot.read()
    assert not isinstance(got, str) and got.step == 6 and got.meta["data"] == {"consumed": 101}
    assert all(torch.equal(got.tensors[k], v) for k, v in rank_state(1).items())
    slot.close()
    for p in pairs:
        p.close()


def test_a_wrong_rebuild_is_caught_by_the_slot_checksums(tmp_path):
    """Parity of another snapshot (a stale one) rebuilds garbage: the slot's crc32s refuse it."""
    layout = RankParity.build(ErasureCode.parse("xor"), 3)
    assert layout is not None
    pairs = write_snapshots(tmp_path, 3)
    images = [p.holding(6).image().clone() for p in pairs]
    size, parity = layout.encode_images(images)
    images[2][-5] ^= 1  # rank 2's bytes changed after its parity was computed
    lengths = [i.numel() for i in images]
    rebuilt = layout.rebuild_images(
        [images[0], None, images[2]], [parity[0], None, parity[2]], lengths, size
    )[1]
    create_slot_file(tmp_path / "fresh", lengths[1] + 4096)
    slot = Slot(tmp_path / "fresh")
    slot.write_image(rebuilt)
    got = slot.read()
    assert isinstance(got, str) and "crc32" in got
    slot.close()
    for p in pairs:
        p.close()


def test_more_losses_than_the_code_covers_are_refused():
    layout = RankParity.build(ErasureCode.parse("xor"), 4)
    assert layout is not None
    with pytest.raises(RebuildError, match=r"has 2 of its 4 shards left, 3 are needed \(checkpoint.ec=xor\)"):
        layout.rebuild_plan([True, False, False, True], [True, False, False, True])
    # one rank lost, but the parity another rank kept for that step missing too: the same refusal
    with pytest.raises(RebuildError, match="3 are needed"):
        layout.rebuild_plan([True, False, True, True], [True, False, False, True])


def test_layout_choices_and_config_errors():
    assert RankParity.build(ErasureCode.parse("none"), 4) is None
    assert RankParity.build(ErasureCode.parse("xor"), 1) is None  # one rank: no other rank to hold parity
    layout = RankParity.build(ErasureCode.parse("xor"), 4)
    assert layout is not None and (layout.k, layout.m) == (3, 1)
    for r in range(4):  # each rank: k stripes in k different groups, parity of a group it gives no stripe to
        data = layout.data_groups(r)
        assert sorted(j for _, j in data) == [0, 1, 2]
        assert all(g not in {g2 for g2, _ in data} for g, _ in layout.parity_groups(r))
    with pytest.raises(
        ConfigError,
        match=r"^checkpoint.ec=rs:4\+2 spreads 6 shards over as many ranks, this run has 3; set checkpoint.ec to rs:1\+2, xor or none$",
    ):
        RankParity.build(ErasureCode.parse("rs:4+2"), 3)
    with pytest.raises(ConfigError, match="set checkpoint.ec to xor or none$"):
        RankParity.build(ErasureCode.parse("rs:1+2"), 2)


def test_resume_picks_the_newest_snapshot_held_or_rebuildable():
    from longtrain.checkpoint.snapshot import newest_restorable

    xor3 = RankParity.build(ErasureCode.parse("xor"), 3)
    everywhere = [({4, 6}, {4, 6})] * 3
    assert newest_restorable(everywhere, -1, xor3, "xor") == (6, [])
    assert newest_restorable(everywhere, 6, xor3, "xor") == (None, [])  # the disk checkpoint is as new
    node_lost = [({4, 6}, {4, 6}), (set(), set()), ({4, 6}, {4, 6})]
    assert newest_restorable(node_lost, -1, xor3, "xor") == (6, [])  # rebuilt from ranks 0 and 2
    # killed while step 6's parity was being exchanged: rank 2 has none of step 6, so step 4
    mid_exchange = [({4, 6}, {4, 6}), (set(), set()), ({4, 6}, {4})]
    step, skipped = newest_restorable(mid_exchange, -1, xor3, "xor")
    assert step == 4 and skipped == [
        "snapshot of step 6: ranks [1] lost it and it cannot be rebuilt "
        "(parity group 2 has 1 of its 3 shards left, 2 are needed (checkpoint.ec=xor))"
    ]
    step, skipped = newest_restorable(node_lost, -1, None, "none")
    assert step is None and skipped[-1].endswith("(checkpoint.ec=none keeps no parity across ranks)")

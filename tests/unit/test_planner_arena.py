"""The arena (planner/arena.py): a recorded layer trace replayed through one buffer of the planned
peak, every tensor a view at its planned offset, checked for being overwritten while live."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longtrain.planner.arena import Arena, replay
from longtrain.planner.layout import Item, plan_layout
from longtrain.planner.trace import LayerShape, record_layer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def trace():
    return record_layer(LayerShape(family="llama", tokens=128, hidden=64), timing_runs=1)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_replay_of_a_recorded_layer_has_zero_fragmentation(trace, phase):
    blocks = trace.phase(phase)
    layout = plan_layout([Item(b.size, b.alloc, b.free) for b in blocks])
    result = replay(blocks, layout)
    assert result.tensors == len(blocks) > 20
    assert result.reserved == result.planned_peak and result.fragmentation == 0
    # The plan reaches the bound (64-byte rounding aside), so the arena is the trace's max-live.
    assert result.planned_peak == layout.lower_bound
    assert result.max_live <= result.reserved <= result.max_live + 64 * len(blocks)


def test_replay_catches_a_layout_that_overlaps_live_tensors(trace):
    blocks = trace.phase("forward")
    layout = plan_layout([Item(b.size, b.alloc, b.free) for b in blocks])
    everything_at_zero = dataclasses.replace(
        layout, offsets=(0,) * len(blocks), peak=max(b.size for b in blocks)
    )
    with pytest.raises(AssertionError, match="overwritten while live"):
        replay(blocks, everything_at_zero)


def test_arena_views_share_its_buffer_and_check_bounds():
    arena = Arena(1024)
    x = arena.view(64, torch.float32, (4, 8))
    x.fill_(1.5)
    assert x.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
    assert arena.buffer[64:192].view(torch.float32).eq(1.5).all()
    with pytest.raises(ValueError, match="outside"):
        arena.view(1000, torch.float32, (8,))
    with pytest.raises(ValueError, match="aligned"):
        arena.view(2, torch.float32, (1,))

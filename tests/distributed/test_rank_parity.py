"""Parity across ranks over gloo (checkpoint/rank_parity.py): the exchange run from a background
thread on its own group gives every rank the parity the one-process reference computes, and the
ranks that lost image and parity get them back bit-exact from the others."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ranks import run_ranks

WORKER = Path(__file__).parent / "_rank_parity_worker.py"


@pytest.mark.parametrize(("ec", "world", "lost"), [("xor", 3, "1"), ("rs:2+2", 4, "0,3")])
def test_parity_exchange_and_rebuild(tmp_path, free_port, ec, world, lost):
    results = run_ranks(WORKER, world, free_port, tmp_path, ec, lost, timeout=60)
    lost_ranks = {int(r) for r in lost.split(",")}
    assert all(r["encoded"] and r["none_without_an_image"] for r in results)
    assert [r["rebuilt"] for r in results] == [True if i in lost_ranks else None for i in range(world)]
    longest = 3000 + 517 * (world - 1)
    k = world - (2 if ec.startswith("rs") else 1)
    per_stripe = math.ceil(math.ceil(longest / k) / 8) * 8
    m = world - k
    assert all(r["parity_bytes"] == m * per_stripe for r in results)  # xor: 1/(N-1) of the largest state

"""bench_parallel's peer is what the benchmark says it is: DeepSpeed's UlyssesSPAttentionHF running
on 4 gloo ranks gives the loss and gradients of the plain HF model on the whole document."""

from __future__ import annotations

from pathlib import Path

import pytest
from ranks import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~30 s: four processes import DeepSpeed

WORKER = Path(__file__).with_name("_peer_worker.py")


def test_peer_equals_one_process_float64(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    for r in run_ranks(WORKER, 4, free_port, tmp_path, timeout=120):
        assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-10)
        assert r["grad_rel"] <= 1e-10, r

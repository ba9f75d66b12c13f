"""One HDP step of a tiny decoder stack over 4 gloo processes (rings and packs) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
from ranks import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_hdp_step_worker.py")


def test_hdp_step_equals_single_process(tmp_path, free_port):
    results = run_ranks(WORKER, 4, free_port, tmp_path)
    layouts = [layout for r in results for layout, _ in r["jobs"]]
    assert "ring" in layouts and "pack" in layouts, "guard: the batch must mix rings and packs"
    assert len({len(r["jobs"]) for r in results}) > 1, "guard: ranks run different numbers of micro-batches"
    for r in results:
        for mode in ("none", "tokenwise"):
            assert r[mode]["loss_diff"] < 1e-10, (mode, r)
            assert r[mode]["max_grad_diff"] < 1e-10 * max(1.0, r[mode]["max_grad"]), (mode, r)
    assert any(r["tokenwise"]["stats"] for r in results), "guard: the token-wise executor ran"

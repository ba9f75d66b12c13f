"""One HDP step of a tiny decoder stack over 4 gloo processes (rings and packs) against one process,
with replicated model states and with FSDP2 over all ranks in lock-step rounds."""

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
        for mode in ("none", "tokenwise", "fsdp"):
            assert r[mode]["loss_diff"] < 1e-10, (mode, r)
            assert r[mode]["max_grad_diff"] < 1e-10 * max(1.0, r[mode]["max_grad"]), (mode, r)
    assert any(r["tokenwise"]["stats"] for r in results), "guard: the token-wise executor ran"
    # fsdp: every rank ran one micro-batch per round, some of them padding, rings and packs mixed
    assert all(r["fsdp"]["sharded"] for r in results), "guard: parameters are FSDP2 DTensors"
    rounds = results[0]["fsdp"]["rounds"]
    assert all(r["fsdp"]["rounds"] == rounds for r in results), "ranks built different rounds"
    assert 0 < sum(r["fsdp"]["empty"] for r in results) < len(rounds) * len(results), rounds
    assert any("ring" in row and "pack" in row for row in rounds), rounds

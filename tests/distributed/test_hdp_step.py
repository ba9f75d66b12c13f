"""One HDP step of a tiny decoder stack over 4 gloo processes (rings and packs) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_hdp_step_worker.py")


def test_hdp_step_equals_single_process(tmp_path, free_port):
    env = {**os.environ, "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(4)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    layouts = [layout for r in results for layout, _ in r["jobs"]]
    assert "ring" in layouts and "pack" in layouts, "guard: the batch must mix rings and packs"
    assert len({len(r["jobs"]) for r in results}) > 1, "guard: ranks run different numbers of micro-batches"
    for r in results:
        for mode in ("none", "tokenwise"):
            assert r[mode]["loss_diff"] < 1e-10, (mode, r)
            assert r[mode]["max_grad_diff"] < 1e-10 * max(1.0, r[mode]["max_grad"]), (mode, r)
    assert any(r["tokenwise"]["stats"] for r in results), "guard: the token-wise executor ran"

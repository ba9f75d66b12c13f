"""Ring attention and Ulysses over 2 and 4 gloo processes against single-process attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_ring_worker.py")


def _launch(world: int, out_dir: Path, port: int) -> list[dict]:
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def _check(results: list[dict], expected_cases: set[str]) -> None:
    seen = set()
    for rank, res in enumerate(results):
        for case, r in res.items():
            seen.add(case)
            tol = 1e-10 if case.endswith("f64") else 1e-5
            assert r["finite"] and r["pad_lse_is_neg_inf"], (rank, case, r)
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert r[key] <= tol, (rank, case, key, r)
            assert r["scale"] > 1e-2, "guard: the oracle is not trivially zero"
    assert seen == expected_cases


def test_ring_and_ulysses_two_ranks(tmp_path, free_port):
    results = _launch(2, tmp_path, free_port)
    _check(
        results,
        {
            "ring2_cpu_flash_f64",
            "ring2_math_f64",
            "ring2_cpu_flash_f32",
            "ring2_reversed_f64",
            "ulysses2_f64",
            "ulysses2_f32",
        },
    )


def test_ring_and_ulysses_four_ranks(tmp_path, free_port):
    results = _launch(4, tmp_path, free_port)
    _check(
        results,
        {
            "ring4_cpu_flash_f64",
            "ring4_math_f64",
            "ring4_cpu_flash_f32",
            "ring4_mha_f64",
            "ring1_f64",
            "ring3_subset_f64",
            "ring3_subset_f32",
            "ring2_pairs_f64",
            "ring4_tiny_f64",
            "ulysses4_f64",
            "ulysses4_f32",
            "ulysses2_group_f64",
        },
    )
    # the 2-token document leaves ring positions 2 and 3 with padding rows only
    assert [r["ring4_tiny_f64"]["rows"] for r in results] == [1, 1, 0, 0]

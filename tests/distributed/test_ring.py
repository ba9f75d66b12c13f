"""Ring attention and Ulysses over 2 and 4 gloo processes against single-process attention."""

from __future__ import annotations

from pathlib import Path

import pytest
from ranks import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_ring_worker.py")


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
    results = run_ranks(WORKER, 2, free_port, tmp_path)
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
    results = run_ranks(WORKER, 4, free_port, tmp_path)
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

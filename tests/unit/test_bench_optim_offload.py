"""The pure pieces of scripts/bench_optim_offload.py: floor ratios, intervals, verdicts, JSON keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_optim_offload.py"
spec = importlib.util.spec_from_file_location("bench_optim_offload", SCRIPT)
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

KEYS = {
    "cpu_adam_vs_floor",
    "nvme_read_vs_raw",
    "nvme_write_vs_raw",
    "step_time_vs_deepspeed",
    "rss_vs_deepspeed",
    "nvme_rss_vs_dram",
    "nvme_time_vs_dram",
    "fsdp_state_bytes_vs_replicated",
    "detail",
}


def test_floor_ratio_is_floor_time_over_step_time():
    # 1e9 parameters at 28 GB/s: the floor is 1 s; a 2 s step is half the floor's speed.
    assert bench.floor_ratios([2.0, 1.0], [28.0, 56.0], 10**9) == pytest.approx([0.5, 0.5])


def test_verdicts_of_a_higher_is_better_target():
    assert bench.summary([0.95] * 7, 0.9)["verdict"] == "hit"
    assert bench.summary([0.85] * 7, 0.9)["verdict"] == "miss"
    spread = bench.summary([0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.99], 0.9)
    assert spread["verdict"] == "at the threshold" and spread["median"] == 0.9
    assert "verdict" not in bench.summary([1.0, 2.0])


def test_median_interval_coverage():
    # n = 10: x_(2)..x_(9) covers the median with 1 - 2 * (1 + 10) / 2**10 >= 0.9; x_(3)..x_(8) would not.
    lo, hi, cov = bench.median_interval([float(i) for i in range(10, 0, -1)])
    assert (lo, hi) == (2.0, 9.0) and cov == pytest.approx(1 - 2 * 11 / 1024)
    # n = 7: x_(2)..x_(6) covers only 0.875, so min..max.
    assert bench.median_interval([float(i) for i in range(1, 8)])[:2] == (1.0, 7.0)
    lo, hi, cov = bench.median_interval([float(i) for i in range(1, 5)])  # n = 4: min..max, < 90%
    assert (lo, hi) == (1.0, 4.0) and cov == pytest.approx(1 - 2 / 16)


def test_rotation_changes_who_goes_first():
    assert [bench.rotated(["a", "b", "c"], r)[0] for r in range(4)] == ["a", "b", "c", "a"]


def test_final_line_has_every_key_and_nulls_what_is_not_built():
    detail = {
        "cpu_update": {"vs_floor": {"ours": {"median": 0.93}}},
        "nvme": {"read_vs_raw": {"median": 0.99}, "write_vs_raw": {"median": 0.97}},
    }
    line = bench.final_line(detail)
    assert set(line) == KEYS
    assert (line["cpu_adam_vs_floor"], line["nvme_read_vs_raw"], line["nvme_write_vs_raw"]) == (
        0.93,
        0.99,
        0.97,
    )
    assert all(
        line[k] is None
        for k in KEYS - {"cpu_adam_vs_floor", "nvme_read_vs_raw", "nvme_write_vs_raw", "detail"}
    )
    json.dumps(line)
    assert bench.final_line({})["cpu_adam_vs_floor"] is None


def test_verdicts_of_a_lower_is_better_target():
    assert bench.lower_summary([0.9] * 7, 1.0)["verdict"] == "hit"
    assert bench.lower_summary([1.1] * 7, 1.0)["verdict"] == "miss"
    assert bench.lower_summary([0.8, 0.9, 1.0, 1.05, 1.2], 1.0)["verdict"] == "at the threshold"
    assert bench.lower_summary([0.5], 0.55)["verdict"] == "hit"  # one number per run: RSS, bytes


def test_final_line_takes_the_end_to_end_ratios():
    ratios = {
        key: bench.lower_summary([0.5, 0.6, 0.7], target) for key, target in bench.LOWER_TARGETS.items()
    }
    line = bench.final_line({"end_to_end": {"ratios": ratios}})
    assert set(line) == KEYS
    assert all(line[key] == 0.6 for key in bench.LOWER_TARGETS)
    assert bench.paired_ratios([2.0, 3.0], [4.0, 3.0]) == [0.5, 1.0]

"""scripts/bench_parallel.py: the pieces its numbers rest on (no training runs, no simulation).

The measured batch must be skewed as described and pack into exactly one step's rows; the
summaries must pair steps by index and drop the warmup; the verdicts must say what the numbers say.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_parallel  # noqa: E402

from longtrain.trainer.data import pack_documents  # noqa: E402


def test_arguments_quick_and_full_defaults_and_bad_values():
    names = ("seq_len", "steps", "warmup", "planner_repeats", "peer_len", "peer_steps")
    quick = bench_parallel.parse_args(["--quick"])
    assert tuple(getattr(quick, n) for n in names) == (1024, 5, 1, 7, 4096, 5)
    full = bench_parallel.parse_args([])
    assert tuple(getattr(full, n) for n in names) == (2048, 12, 2, 21, 8192, 10)
    assert bench_parallel.parse_args(["--quick", "--steps", "8"]).steps == 8
    bad_args = (
        ["--steps", "3", "--warmup", "2"],
        ["--seq-len", "1000"],
        ["--planner-repeats", "0"],
        ["--peer-len", "1020"],
        ["--peer-steps", "2"],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            bench_parallel.parse_args(bad)


def test_verdicts_and_ratio():
    assert bench_parallel.verdict(2.0, 2.0, at_least=True) == "hit"
    assert bench_parallel.verdict(1.99, 2.0, at_least=True) == "miss"
    assert bench_parallel.verdict(1.10, 1.10, at_least=False) == "hit"
    assert bench_parallel.verdict(1.2, 1.10, at_least=False) == "miss"
    assert bench_parallel.verdict(None, 1.0, at_least=True) == "not measured"
    assert bench_parallel.ratio(3.0, 2.0) == 1.5
    assert bench_parallel.ratio(1.0, 0.0) is None


def test_sim_keys_take_the_worst_case_per_target():
    rows = [
        {"context": "256K", "balanced_vs_static": 2.4, "imbalance": 1.00, "planner_ms_1024_docs": 3.0},
        {"context": "256K", "balanced_vs_static": 1.9, "imbalance": 1.05, "planner_ms_1024_docs": 60.0},
        {"context": "1M", "balanced_vs_static": 1.5, "imbalance": 1.20, "planner_ms_1024_docs": 4.0},
    ]
    keys = bench_parallel.sim_keys({"rows": rows})
    assert keys["sim_hdp_vs_static_256k"] == 1.9 and keys["sim_hdp_vs_static_256k_verdict"] == "miss"
    assert keys["sim_hdp_vs_static_1m"] == 1.5
    assert keys["sim_imbalance"] == 1.20 and keys["sim_imbalance_verdict"] == "miss"
    assert keys["planner_ms"] == 60.0 and keys["planner_ms_verdict"] == "miss"


@pytest.mark.parametrize("seq_len", [1024, 2048])
def test_skewed_batch_is_two_long_documents_and_short_ones_in_one_step(seq_len):
    lengths = bench_parallel.skewed_lengths(seq_len)
    assert sorted(lengths)[-2:] == [seq_len, seq_len]
    short = sorted(lengths)[:-2]
    assert len(short) > 20 and 32 <= min(short) and max(short) <= seq_len // 8
    docs = [[1] * s for s in lengths]
    assert len(pack_documents(docs, seq_len, pad_id=0, seed=None)) == bench_parallel.ROWS
    assert bench_parallel.skewed_lengths(seq_len) == lengths, "deterministic"


def test_systems_see_the_same_rows_per_step():
    hdp = bench_parallel.system_overrides("hdp", 1024)
    assert "parallel.token_capacity=512" in hdp and "train.global_batch_tokens=8192" in hdp
    assert "parallel.hdp_balance=false" in bench_parallel.system_overrides("naive", 1024)
    static = bench_parallel.system_overrides("static", 1024)
    # dp 2 x cp 2 on 4 ranks, 1 row per micro-batch: 2 groups x 4 micro-batches = 8 rows
    assert static == ["parallel.mode=cp", "parallel.context_parallel=2", "train.grad_accum=4"]


def _records(values: list[tuple[float, float]]) -> list[dict]:
    return [{"step": i + 1, "imbalance": im, "tokens_per_s": tps} for i, (im, tps) in enumerate(values)]


def test_measured_summary_drops_warmup_and_pairs_steps():
    runs = {
        "hdp": _records([(9.0, 1.0), (1.1, 200.0), (1.2, 300.0), (1.0, 100.0)]),
        "naive": _records([(9.0, 1.0), (1.5, 100.0), (1.6, 100.0), (1.7, 100.0)]),
        "static": _records([(9.0, 1.0), (1.3, 100.0), (1.3, 100.0), (1.3, 200.0)]),
    }
    m = bench_parallel.measured_summary(runs, warmup=1)
    assert m["hdp"]["imbalance"]["median"] == pytest.approx(1.1)
    assert m["naive"]["imbalance"]["per_step"] == [1.5, 1.6, 1.7]
    assert m["hdp_vs_static"]["per_step"] == [2.0, 3.0, 0.5]  # step by step, not medians divided
    assert m["hdp_vs_static"]["median"] == 2.0
    keys = bench_parallel.measured_keys(m)
    assert set(keys) == set(bench_parallel.MEASURED_KEYS)
    assert keys["measured_imbalance_unbalanced"] == pytest.approx(1.6)


def test_peer_summary_pairs_slowest_rank_step_times_and_reports_rss():
    ours = [
        {"step": i + 1, "busy_max_s": t, "mem_peak_bytes": m}
        for i, (t, m) in enumerate([(9.0, 100), (1.0, 200), (2.0, 300), (1.5, 300)])
    ]
    peer = {"step_s": [9.0, 2.0, 2.0, 1.0], "rss": 150}
    out = bench_parallel.peer_summary(ours, peer, warmup=1)
    assert out["peer_detail"]["step_s_ratio"]["per_step"] == [0.5, 1.0, 1.5]
    assert out["measured_cp_vs_peer"] == 1.0 and out["measured_cp_vs_peer_verdict"] == "at the threshold"
    assert out["peer_detail"]["rss_ratio"] == 2.0
    assert out["peer"] == bench_parallel.PEER_NAME

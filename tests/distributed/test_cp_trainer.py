"""The trainer under parallel.mode=hdp and parallel.mode=cp against one process (issue 12's contract).

Oracle: ``longtrain train tiny_cpu --nproc 1 parallel.mode=hdp`` (token-wise activation memory
with alpha=auto and tiles, as the recipe has it), float64, 4 steps. Every multi-rank run must see
the same documents (loss tokens per step) and log the same loss and gradient norm within 1e-9.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ranks import run_ranks

pytestmark = pytest.mark.distributed

SHARDS_WORKER = Path(__file__).with_name("_shards_worker.py")
COMMON = [
    "train.dtype=float64",
    "train.seq_len=128",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "checkpoint.every=2",
    "logging.progress=false",
    "logging.peak_flops=1e12",
    "train.steps=4",
]


def train(cmd: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*cmd, "train", "tiny_cpu", *extra, *COMMON, f"output_dir={out}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(oracle: list[dict], run: list[dict]) -> None:
    assert [r["step"] for r in run] == [r["step"] for r in oracle] == [1, 2, 3, 4]
    for a, b in zip(oracle, run, strict=True):
        assert a["loss_tokens"] == b["loss_tokens"], "the same documents"
        assert abs(a["loss"] - b["loss"]) <= 1e-9 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-9 * a["grad_norm"], a["step"]
        assert b["imbalance"] >= 1.0 and len(b["busy_s"]) >= 2 and min(b["busy_s"]) > 0, b


_ORACLE: dict[str, list[dict]] = {}


@pytest.fixture
def oracle(tmp_path_factory, longtrain_cmd) -> list[dict]:
    """The one-process run, made once per module (the tests compare against it)."""
    if "metrics" not in _ORACLE:
        out = tmp_path_factory.mktemp("one")
        proc = train(longtrain_cmd, out, "parallel.mode=hdp")
        assert proc.returncode == 0, proc.stderr[-3000:]
        _ORACLE["metrics"] = read_metrics(out)
    return _ORACLE["metrics"]


def test_hdp_four_ranks_logs_the_losses_of_one_process(tmp_path, longtrain_cmd, oracle):
    """The same command on 4 ranks (the capacity fits a packed row: packs only)."""
    proc = train(longtrain_cmd, tmp_path, "--nproc", "4", "parallel.mode=hdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_metrics(tmp_path)
    assert_same_run(oracle, run)
    assert all(len(r["busy_s"]) == 4 for r in run)


def test_hdp_rings_and_packs_and_resume_on_another_world_size(tmp_path, longtrain_cmd, oracle):
    """token_capacity 64 < seq_len 128: long documents on rings, ranks running different numbers
    of micro-batches; the step-2 checkpoint resumes on 2 ranks and continues with the same losses
    (the data position does not depend on the world size), there with model states sharded by FSDP2
    (the jobs in lock-step rounds; a fixed alpha: see check_layout)."""
    capacity = "parallel.token_capacity=64"
    proc = train(longtrain_cmd, tmp_path, "--nproc", "4", "parallel.mode=hdp", capacity)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_metrics(tmp_path)
    assert_same_run(oracle, run)
    assert all(r["hdp_rings"] > 0 for r in run) and any(r["hdp_jobs"] > r["hdp_rings"] for r in run), (
        "guard: rings and packs"
    )
    assert any(r["hdp_rank_jobs_min"] < r["hdp_rank_jobs_max"] for r in run), (
        "guard: uneven micro-batch counts"
    )
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    fsdp = ("parallel.shard=fsdp", "activation.alpha=0.5")
    proc = train(longtrain_cmd, tmp_path, "--nproc", "2", "parallel.mode=hdp", capacity, *fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    resumed = read_metrics(tmp_path)
    assert_same_run(oracle, resumed)
    assert [len(r["busy_s"]) for r in resumed] == [4, 4, 2, 2]
    for r in resumed[2:]:  # lock-step rounds: every rank ran hdp_rounds micro-batches, some padding
        assert r["hdp_rings"] > 0 and 0 <= r["hdp_empty_rounds"] < 2 * r["hdp_rounds"], r
        assert r["optim_device_bytes"] < 0.55 * oracle[r["step"] - 1]["optim_device_bytes"], "sharded"


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ("parallel.cp_impl=ring",)),
        (2, ("parallel.cp_impl=ulysses",)),
        # 2 cp groups of 2 with micro-batches of 2 rows: the oracle's 4 rows a micro-batch; FSDP2
        # over dp x cp (a fixed alpha: see check_layout)
        (4, ("data.micro_batch_size=2", "parallel.shard=fsdp", "activation.alpha=0.5")),
    ],
    ids=["ring", "ulysses", "dp2 x cp2 fsdp"],
)
def test_cp_logs_the_losses_of_one_process(tmp_path, longtrain_cmd, oracle, nproc, extra):
    cp = ("parallel.mode=cp", "parallel.context_parallel=2")
    proc = train(longtrain_cmd, tmp_path, "--nproc", str(nproc), *cp, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_metrics(tmp_path)
    assert_same_run(oracle, run)
    if "parallel.shard=fsdp" in extra:  # model states sharded over all 4 ranks
        assert all(
            b["optim_device_bytes"] < 0.3 * a["optim_device_bytes"] for a, b in zip(oracle, run, strict=True)
        )


def test_shards_with_padding_only_ranks_equal_one_process(tmp_path, free_port):
    """Ring and Ulysses shards (token-wise executor, tiles) summed over 2 ranks equal one process;
    a rank holding only padding contributes loss 0 and zero gradients, never NaN."""
    results = run_ranks(SHARDS_WORKER, 2, free_port, tmp_path)
    for res in results:
        for case, r in res.items():
            assert r["finite"], (case, r)
            assert r["loss_diff"] <= 1e-10 * max(1.0, r["grad_scale"]), (case, r)
            assert r["grad_diff"] <= 1e-10 * max(1.0, r["grad_scale"]), (case, r)
    for impl in ("ring", "ulysses"):
        pad = results[1][f"one_token/{impl}"]
        assert pad["padding_only"] and pad["local_loss"] == 0.0, pad


def test_world_size_not_matching_is_one_line(tmp_path, longtrain_cmd):
    proc = train(longtrain_cmd, tmp_path, "--nproc", "2", "parallel.mode=cp", "parallel.context_parallel=4")
    assert proc.returncode == 2
    assert "parallel.context_parallel=4 does not match the world size 2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

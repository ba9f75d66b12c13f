"""FSDP2 sharding (``parallel.shard=fsdp``) against one process.

Oracle: one process over the whole global batch, the same activation config and optimizer.
Float64: parameters after 3 steps within 1e-10 relative (to each tensor's largest element; the
sharded run sums gradients over ranks in another order); the trainer's losses within 1e-9.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ranks import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_fsdp_worker.py")
TOKENWISE_TILES = {"mode": "tokenwise", "alpha": 0.37, "keep_last": 1, "tile_rows": 16}


@pytest.mark.parametrize(
    "world, optim, activation",
    [
        (2, {"grad_clip": 1.0}, TOKENWISE_TILES),
        (4, {"grad_clip": 0.05, "offload": "dram"}, TOKENWISE_TILES),  # clipping active
        (
            2,
            {"grad_clip": 1.0, "offload": "nvme", "nvme_dir": "{tmp}"},
            {"mode": "recompute", "tile_rows": 24},
        ),
    ],
    ids=["2 ranks device tier", "4 ranks dram tier", "2 ranks nvme tier recompute"],
)
def test_fsdp_equals_one_process(tmp_path, free_port, world, optim, activation):
    optim = {k: (str(tmp_path) if v == "{tmp}" else v) for k, v in optim.items()}
    results = run_ranks(
        WORKER, world, free_port, tmp_path, json.dumps(optim), json.dumps(activation), timeout=120
    )
    for r in results:
        assert r["moved"] > 1e-6, "guard: training must change the parameters"
        assert r["worst_rel"] <= 1e-10, r
        for oracle_norm, norm in r["norms"]:
            assert abs(norm - oracle_norm) <= 1e-10 * oracle_norm, r["norms"]
        # model states are sharded: each rank holds ~1/world of the optimizer state
        assert r["optim_bytes"] <= r["oracle_optim_bytes"] / world * 1.1 + 4096, r
    if activation["mode"] == "tokenwise":
        # what each rank offloads is its own rows' activations, never a parameter
        per_row = [r["host_bytes"] / r["rows"] for r in results]
        assert max(per_row) == min(per_row) > 0, per_row


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_fsdp_two_ranks_logs_the_losses_of_one_process_and_resumes(tmp_path, longtrain_cmd):
    """The issue's contract: tiny_cpu (tokenwise, tiles) with --nproc 2 parallel.shard=fsdp and
    micro-batches of 2 logs the losses of one process with micro-batches of 4 (float64, 1e-9); its
    checkpoint resumes under FSDP and continues with the one-process run's losses."""
    common = [
        "train.dtype=float64",
        "train.seq_len=128",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "checkpoint.every=2",
        "logging.progress=false",
        "logging.peak_flops=1e12",
    ]

    def train(out: Path, steps: int, *extra: str) -> None:
        cmd = [
            *longtrain_cmd,
            "train",
            "tiny_cpu",
            *extra,
            *common,
            f"train.steps={steps}",
            f"output_dir={out}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    sharded, single = tmp_path / "fsdp", tmp_path / "one"
    fsdp_args = ("--nproc", "2", "parallel.shard=fsdp", "data.micro_batch_size=2")
    train(sharded, 4, *fsdp_args)
    train(single, 4, "data.micro_batch_size=4")
    one, two = read_metrics(single), read_metrics(sharded)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-9 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-9 * a["grad_norm"], a["step"]
        assert b["optim_device_bytes"] < 0.55 * a["optim_device_bytes"], "model states are sharded"
    # a failure after step 2: the newest checkpoint is step 2; the rerun resumes from it
    shutil.rmtree(sharded / "checkpoints" / "step-000004")
    train(sharded, 4, *fsdp_args)
    resumed = read_metrics(sharded)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(two[2:], resumed[2:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * a["loss"], (a["step"], a["loss"], b["loss"])


def test_trainer_fsdp_float32_on_gloo_sums_gradients(tmp_path, longtrain_cmd):
    """float32 (the default dtype): FSDP's reduce-scatter must be a plain sum on gloo (it has no
    PREMUL_SUM); the losses and gradient norms are one process's within float32 rounding."""
    common = [
        "train.seq_len=128",
        "train.steps=2",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "checkpoint.enabled=false",
        "logging.progress=false",
        "logging.peak_flops=1e12",
        "activation.mode=none",
    ]

    def train(out: Path, *extra: str) -> list[dict]:
        cmd = [*longtrain_cmd, "train", "tiny_cpu", *extra, *common, f"output_dir={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return read_metrics(out)

    two = train(tmp_path / "fsdp", "--nproc", "2", "parallel.shard=fsdp", "data.micro_batch_size=2")
    one = train(tmp_path / "one", "data.micro_batch_size=4")
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a["step"], a, b)

"""Metric writers and the FLOP/MFU helpers."""

from __future__ import annotations

import json

import pytest
import torch

from longtrain.trainer.metrics import (
    MetricsWriter,
    detect_peak_flops,
    model_flops_per_token,
    peak_memory_bytes,
)

ROW = {
    "step": 1,
    "loss": 2.5,
    "lr": 1e-3,
    "grad_norm": 0.5,
    "tokens": 64,
    "tokens_per_s": 10.0,
    "mfu": 0.1,
    "mem_peak_bytes": 1 << 20,
}


def test_jsonl_appends_one_object_per_log(tmp_path):
    for start in (0, 1):  # a resumed run appends to the same file
        writer = MetricsWriter(
            str(tmp_path),
            enabled=True,
            progress=False,
            total_steps=2,
            start_step=start,
            wandb_cfg=None,
            config={},
        )
        writer.log({**ROW, "step": start + 1})
        writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_non_main_rank_writes_nothing(tmp_path):
    writer = MetricsWriter(
        str(tmp_path / "out"),
        enabled=False,
        progress=True,
        total_steps=2,
        start_step=0,
        wandb_cfg=None,
        config={},
    )
    writer.log(ROW)
    writer.close()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_logging_needs_no_network(tmp_path, monkeypatch, mode):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(
        str(tmp_path),
        enabled=True,
        progress=False,
        total_steps=1,
        start_step=0,
        wandb_cfg={"project": "longtrain-test", "name": "t", "id": "run1"},
        config={"seed": 0},
    )
    writer.log(ROW)
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
    if mode == "offline":
        assert list((tmp_path / "wandb").glob("offline-run-*")), "offline wandb run directory missing"


def test_flops_per_token_counts_dense_and_causal_attention():
    # 6N for the dense part; attention: 6 * layers * hidden_q * mean document length
    assert model_flops_per_token(1000, 2, 64, 0.0) == 6000
    assert model_flops_per_token(1000, 2, 64, 100.0) == 6000 + 6 * 2 * 64 * 100


def test_cpu_peak_flops_is_the_best_measured_matmul_rate(monkeypatch):
    """On CPU the peak is 2 n^3 FLOPs over the fastest of 5 timed rounds of 4 matmuls (n = 1024);
    with a clock whose rounds take 4, 2, 3, 2, 5 s, the best matmul takes 0.5 s."""
    import longtrain.trainer.metrics as metrics

    ticks = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0, 30.0, 32.0, 40.0, 45.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    assert detect_peak_flops(torch.device("cpu"), torch.float32) == 2 * 1024**3 / 0.5


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, 989e12 / 2),  # TF32 tensor cores: half the bf16 rate
        ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312e12),
    ],
)
def test_gpu_peak_flops_is_the_datasheet_value(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert detect_peak_flops(torch.device("cuda"), dtype) == expected


def test_cpu_peak_memory_is_the_process_peak_rss():
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak = peak_memory_bytes(torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert before <= peak <= after
    # Not "peak >= the current RSS": Linux raises ru_maxrss lazily (when memory is unmapped or the
    # process exits), so the current RSS can exceed it for a while.
    assert peak > psutil.Process().memory_info().rss // 4  # the process's own peak, not a child's

"""The planner's estimates (planner/estimate.py): parameter counts from the meta-device model,
the memory categories of each mode, and ``--dry-run`` routed through them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.planner.estimate import (
    Job,
    LayerChoice,
    Layout,
    ModelShape,
    configured_memory,
    device_total,
    estimate,
    memory_bytes,
)
from longtrain.planner.hardware import hardware
from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return ModelShape.of_config(compose("llama3_8b_128k"))


def test_parameter_counts_from_the_meta_model(llama8b):
    # Llama-3-8B (untied 128256-token embeddings): 8,030,261,248 parameters, as HF reports it
    assert llama8b.params == 8_030_261_248
    assert llama8b.layers == 32 and llama8b.kv_heads == 8 and llama8b.head_dim == 128
    assert llama8b.other_params == 2 * 128256 * 4096 + 4096


def test_activation_bytes_per_token_follow_the_layer_formula(llama8b):
    e, h, ffn = 2, 4096, 14336
    assert llama8b.whole_bytes == e * (h + 32 * 128 + 32)  # input, attention output, logsumexp
    assert llama8b.plain_bytes == e * (10 * h + 4 * 8 * 128 + 3 * ffn)


def test_modes_order_device_memory(llama8b):
    """none keeps every layer's saved tensors, recompute the inputs, tokenwise nothing; tiles shrink
    the layer's transient; offloaded bytes go to the host tier."""
    job, layout = Job(32768), Layout(8, 1, "fsdp", "dram")
    n = llama8b.layers

    def mem(choice: LayerChoice) -> dict[str, int]:
        return memory_bytes(llama8b, layout, job, [choice] * n)

    none, rec, tok, tiled = (
        mem(LayerChoice("keep")),
        mem(LayerChoice("recompute")),
        mem(LayerChoice("tokenwise", 0.5, "host")),
        mem(LayerChoice("tokenwise", 0.5, "host", 1024)),
    )
    assert none["activations"] == n * 32768 * llama8b.plain_bytes
    assert rec["activations"] == n * 32768 * 2 * 4096
    assert tok["activations"] == 0 and tok["host.activations"] > 0 and none["host.activations"] == 0
    assert tiled["layer_peak"] < tok["layer_peak"]
    assert device_total(tiled) < device_total(rec) < device_total(none)
    assert none["host.optimizer"] == 8 * llama8b.params // 8  # AdamW m, v sharded over 8 ranks


def test_more_offload_costs_time_only_past_the_link(llama8b):
    """Recompute falls as alpha grows; copies start to show once they outgrow the layer's compute."""
    hw = hardware("h100_80g")
    job, layout = Job(131072), Layout(8, 8, "fsdp", "dram")
    times = [
        estimate(llama8b, layout, job, [LayerChoice("tokenwise", a, "host", 4096)] * 32, hw).parts_s
        for a in (0.0, 0.5, 1.0)
    ]
    assert times[0]["recompute"] > times[1]["recompute"] > times[2]["recompute"] == 0
    assert all(t["compute"] == times[0]["compute"] for t in times)


def test_configured_memory_matches_the_uniform_plan():
    cfg = compose("tiny_cpu", ["activation.mode=none"])
    shape = ModelShape.of_config(cfg)
    mem = configured_memory(cfg, shape)
    t = cfg.train.seq_len * cfg.data.micro_batch_size
    assert mem["activations"] == shape.layers * t * shape.plain_bytes


def test_dry_run_prints_the_planner_estimate(capsys):
    assert main(["train", "tiny_cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("planner estimate per device"))
    assert "layer_peak" in line and "total" in line


def test_predicted_peak_within_15_percent_of_the_measured_one():
    """Eight plans of a small Llama on CPU (tests/planner_calibration.py, in a fresh process: the
    device-bytes counter reads the process's whole heap, which threads left by other tests move).
    Measured when written: predicted / measured 0.89 (recompute with tiles) to 1.12 (tokenwise
    alpha 1)."""
    script = Path(__file__).resolve().parents[1] / "planner_calibration.py"
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    )
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    if ratios is None:
        pytest.skip("needs glibc mallinfo2")
    assert len(ratios) == 8 and all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


def _time_ratios(*flags: str) -> dict[str, float]:
    script = Path(__file__).resolve().parents[1] / "planner_calibration.py"
    out = subprocess.run(
        [sys.executable, str(script), "--time", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return {name: r["ratio"] for name, r in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_predicted_compute_thread_time_within_25_percent_of_the_measured_one():
    """The same eight plans' step times (forward, backward, AdamW) composed from one profile of the
    step's pieces (planner/profile.py) against measured steps, both as the compute thread's CPU
    time (one torch thread; another job's load does not stretch it), the fastest over rounds
    that interleave them, in a fresh process (~16 s). Measured: 0.87-1.05 with no other job
    running, 0.86-1.02 at load 4 on 2 cores."""
    ratios = _time_ratios("--cpu-time")
    assert len(ratios) == 8 and all(0.75 <= r <= 1.25 for r in ratios.values()), ratios


@pytest.mark.slow
def test_predicted_step_time_within_25_percent_of_the_measured_one():
    """As above in wall time, copy waits included. Slow: it needs a quiet machine, as the
    token-wise plans' copy threads need the second core; with another job's load (load average
    4.5 on 2 cores) the ratios spread to 0.76-1.13; with no other job running 0.85-1.02."""
    ratios = _time_ratios()
    assert len(ratios) == 8 and all(0.75 <= r <= 1.25 for r in ratios.values()), ratios


@pytest.mark.slow
def test_planned_alpha_is_within_5_percent_of_the_best_of_a_sweep():
    """Behind an emulated 0.5 GB/s link, four token-wise layers at the alpha the planner picks
    (decide.uniform_alpha on the measured profile) step no slower than 1.05 x the fastest of
    alpha 0, 0.25, ..., 1 (tests/planner_calibration.py --link; ~25 s, a quiet machine)."""
    script = Path(__file__).resolve().parents[1] / "planner_calibration.py"
    out = subprocess.run(
        [sys.executable, str(script), "--link", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["planned_vs_best"] <= 1.05, result

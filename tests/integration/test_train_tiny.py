"""The tiny_cpu recipe end to end: train, log, checkpoint, crash, resume, compare, CLI."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from longtrain.optim import lr_factor
from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose
from longtrain.trainer.train import Job, prepare, train

METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_peak_bytes")
FAST = [
    "train.seq_len=128",
    "data.micro_batch_size=2",
    "train.grad_accum=1",
    "logging.progress=false",
    "logging.peak_flops=1e12",  # skip the matmul benchmark; mfu is then achieved FLOP/s / 1e12
]


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_cpu_trains_logs_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = compose(
        "tiny_cpu", [*FAST, "train.steps=12", "train.log_every=2", "checkpoint.every=4", f"output_dir={out}"]
    )
    logged = train(cfg)

    rows = read_metrics(out)
    assert rows == logged  # what train() returns is what was written
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for r in rows:
        assert set(METRIC_KEYS) <= set(r)
        assert all(isinstance(r[k], int | float) and math.isfinite(r[k]) for k in METRIC_KEYS)
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] > 0 and r["mem_peak_bytes"] > 2**20
        assert r["tokens"] == r["step"] * 2 * 128  # every input position, padding included
        assert 0 < r["loss_tokens"] <= 2 * 127
        # the learning rate the step's update used: step k (1-based) runs at lr * factor(k - 1)
        assert r["lr"] == pytest.approx(cfg.optim.lr * lr_factor(r["step"] - 1, 12, cfg.optim), rel=1e-12)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # a tiny model on its own data learns fast

    # config.yaml is written and composes back to the same config
    assert compose(str(out / "config.yaml")) == cfg
    # checkpoints at 4, 8, 12; keep=2 in the recipe
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008", "step-000012"]
    state = json.loads((out / "checkpoints" / "step-000012" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["data"]["consumed_microbatches"] == 12


def test_validation_loss_is_logged_and_equals_a_plain_pass(tmp_path):
    """data.val_fraction holds documents out; train.eval_every logs val_loss (also between log steps
    and after the last step), equal to a plain forward over every validation row with the final weights."""
    out = tmp_path / "run"
    cfg = compose(
        "tiny_cpu",
        [
            *FAST,
            "train.dtype=float64",
            "train.steps=8",
            "optim.warmup_steps=2",
            "train.log_every=3",
            "train.eval_every=4",
            "data.val_fraction=0.05",
            "checkpoint.every=100",
            f"output_dir={out}",
        ],
    )
    job = prepare(cfg)
    try:
        logged = job.run()
        assert [(r["step"], "loss" in r, "val_loss" in r) for r in logged] == [
            (3, True, False),
            (4, False, True),  # a validation-only line
            (6, True, False),
            (8, True, True),
        ]
        assert read_metrics(out) == logged
        rows, loss_sum, tokens = job.val_rows, 0.0, 0
        assert len(rows) >= 2
        with torch.no_grad():
            for i in range(len(rows)):  # one row at a time (no grad: the executor runs the layers plainly)
                sl = slice(i, i + 1)
                o = job.model(
                    input_ids=rows.input_ids[sl].long(),
                    labels=rows.labels[sl].long(),
                    position_ids=rows.position_ids[sl].long(),
                )
                loss_sum, tokens = loss_sum + o.loss_sum.item(), tokens + o.num_tokens
        assert logged[-1]["val_tokens"] == tokens
        assert logged[-1]["val_loss"] == pytest.approx(loss_sum / tokens, rel=1e-12)
        assert logged[1]["val_loss"] > logged[-1]["val_loss"]  # it learns on held-out text too
    finally:
        job.close()


def test_every_forward_gets_the_host_document_spans(tmp_path, monkeypatch):
    """Each micro-batch's document spans are computed on the host when the batch is built; every
    training and evaluation forward gets them (none reads position_ids back from the device)."""
    from longtrain.trainer.model.adapter import CausalLM
    from longtrain.trainer.model.attention import DocSpans

    given = []
    original = CausalLM.layer_inputs

    def spy(self, input_ids, position_ids=None, doc_spans=None, *rest):
        given.append(doc_spans)
        return original(self, input_ids, position_ids, doc_spans, *rest)

    monkeypatch.setattr(CausalLM, "layer_inputs", spy)
    cfg = compose(
        "tiny_cpu",
        [
            *FAST,
            "train.steps=2",
            "optim.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_batches=1",
            "data.val_fraction=0.05",
            "checkpoint.enabled=false",
            f"output_dir={tmp_path}",
        ],
    )
    logged = train(cfg)
    assert "val_loss" in logged[-1]
    assert len(given) == 2 + 1 and all(isinstance(d, DocSpans) for d in given)  # 2 train + 1 eval forwards


class Crash(RuntimeError):
    pass


def test_crash_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """float64: a run killed after step 6 and resumed logs the same losses for steps 7..12 as an
    uninterrupted run (|diff| <= 1e-12), and ends with the same parameters and optimizer state."""
    common = [
        *FAST,
        "train.seq_len=64",
        "train.dtype=float64",
        "train.steps=12",
        "train.log_every=1",
        "checkpoint.every=6",
    ]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    cfg_a = compose("tiny_cpu", [*common, f"output_dir={run_a}"])
    cfg_b = compose("tiny_cpu", [*common, f"output_dir={run_b}"])
    logged_a = train(cfg_a)
    assert [r["step"] for r in logged_a] == list(range(1, 13))

    # run B dies inside step 7, after the step-6 checkpoint
    real_step, done = Job.train_step, []

    def crashing_step(self, micro_batches):
        if len(done) == 6:
            raise Crash("simulated failure in step 7")
        done.append(1)
        return real_step(self, micro_batches)

    monkeypatch.setattr(Job, "train_step", crashing_step)
    with pytest.raises(Crash):
        train(cfg_b)
    monkeypatch.undo()
    assert [p.name for p in (run_b / "checkpoints").iterdir()] == ["step-000006"]
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, 7))

    capsys.readouterr()
    logged_b = train(cfg_b)  # same command again: resumes from step 6
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in logged_b] == list(range(7, 13))
    for a, b in zip(logged_a[6:], logged_b, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-12, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-12 * a["grad_norm"]
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
    # metrics.jsonl of the resumed run: every step exactly once
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, 13))

    final_a = load_file(run_a / "checkpoints" / "step-000012" / "model.safetensors")
    final_b = load_file(run_b / "checkpoints" / "step-000012" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert final_a[name].dtype == torch.float64
        assert (final_a[name] - final_b[name]).abs().max().item() <= 1e-12, name
    opt_a = torch.load(run_a / "checkpoints" / "step-000012" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(run_b / "checkpoints" / "step-000012" / "optimizer.pt", weights_only=False)
    for key, state in opt_a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[name], opt_b["optimizer"]["state"][key][name], rtol=1e-10, atol=1e-18)
    assert opt_a["scheduler"]["last_epoch"] == opt_b["scheduler"]["last_epoch"] == 12

    # rerunning a finished output_dir trains nothing and writes nothing
    metrics_before = (run_a / "metrics.jsonl").read_text()
    assert train(cfg_a) == []
    assert (run_a / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["step-000006", "step-000012"]


def test_cli_end_to_end(tmp_path, longtrain_cmd, capsys):
    out = tmp_path / "cli"
    cmd = [
        *longtrain_cmd,
        "train",
        "tiny_cpu",
        "train.steps=4",
        "optim.warmup_steps=2",
        *FAST,
        "train.log_every=2",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "longtrain: done: step 4" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step-000004").is_dir()

    # the same command again (in-process: no second interpreter start-up) finds nothing to do
    capsys.readouterr()
    assert main(cmd[len(longtrain_cmd) :]) == 0
    assert "already finished 4 steps" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [2, 4]


def test_progress_bar_shows_the_current_steps_loss(tmp_path, monkeypatch, capsys, one_intra_op_thread):
    """Every frame "k/N" of the bar shows step k's loss (not step k-1's)."""
    import functools
    import re

    import tqdm

    # print every update (the default 0.1 s minimum interval would skip frames of fast steps)
    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=0, miniters=1))
    overrides = [*FAST, "train.steps=3", "train.log_every=1", "optim.warmup_steps=1", "model.num_layers=1"]
    cfg = compose("tiny_cpu", [*overrides, "logging.progress=true", f"output_dir={tmp_path}"])
    logged = train(cfg)
    frames = re.findall(r" (\d+)/3 \[[^\]]*loss=([0-9.]+)", capsys.readouterr().err)
    shown = {int(step): loss for step, loss in frames}
    assert shown == {r["step"]: f"{r['loss']:.4f}" for r in logged}

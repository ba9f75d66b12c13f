"""``longtrain train RECIPE planner.auto=true``: plans (planner/decide.py, hardware=cpu), writes the
plan under output_dir and trains with it, keys set on the command line as set."""

from __future__ import annotations

import json

import yaml

from longtrain.trainer.cli import main

SMALL = ["train.seq_len=128", "data.micro_batch_size=2", "train.grad_accum=1", "optim.warmup_steps=0"]


def test_auto_plans_writes_and_runs_the_plan(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "tiny_cpu",
        "planner.auto=true",
        "activation.mode=tokenwise",  # set explicitly: the plan keeps it
        "activation.keep_last=0",
        *SMALL,
        "train.steps=2",
        "logging.progress=false",
        f"output_dir={out}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert [layer["mode"] for layer in plan["layers"]] == ["tokenwise"] * 4
    assert all(0.0 <= layer["alpha"] <= 1.0 for layer in plan["layers"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["activation"]["plan"] == str(out / "plan.json")
    assert saved["activation"]["keep_last"] == 0 and saved["planner"]["auto"] is False
    assert f"planner.auto: running tiny_cpu activation.plan={out / 'plan.json'}" in printed
    assert "done: step 2" in printed
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2


def test_auto_with_a_plan_file_is_one_line_error(tmp_path, capsys):
    argv = ["train", "tiny_cpu", "planner.auto=true", "activation.plan=x.json", f"output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop activation.plan or planner.auto" in err[0]

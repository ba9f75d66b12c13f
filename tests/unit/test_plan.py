"""``--dry-run``: the paths it checks (and says it does not), and the activation bytes of the
configured ``activation.mode`` on the device and the host/file tier."""

from __future__ import annotations

import json

import pytest

from longtrain.planner.estimate import activation_bytes, format_bytes, meta_model
from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose
from longtrain.trainer.train import prepare

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = ["train.seq_len=128", "data.micro_batch_size=2", "train.grad_accum=1", "model.vocab_size=4096"]


def dry_run(capsys, argv: list[str]) -> tuple[int, str, list[str]]:
    code = main(["train", *argv, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["data.path={missing}"], ["data.path"]),
        (["data.path={jsonl}", "data.tokenizer={missing}"], ["data.tokenizer"]),
        (["data.path={missing}", "data.tokenizer={missing}"], ["data.path", "data.tokenizer"]),
    ],
)
def test_dry_run_fails_on_missing_data_path_or_tokenizer(capsys, tmp_path, jsonl, overrides, names):
    missing = tmp_path / "missing"
    argv = ["tiny_cpu", "data.source=jsonl", *(o.format(missing=missing, jsonl=jsonl) for o in overrides)]
    code, out, err = dry_run(capsys, argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("longtrain: error: "), err
    for name in names:
        assert name in err[0]
    assert str(missing) in err[0]
    assert "config is valid" not in out


def test_dry_run_says_what_it_checked_and_what_not(capsys, jsonl):
    code, out, err = dry_run(capsys, ["tiny_cpu", "data.source=jsonl", f"data.path={jsonl}"])
    assert code == 0, err
    checked = next(line for line in out.splitlines() if line.startswith("checked:"))
    assert "data.path" in checked and "1 file" in checked and "data.tokenizer" in checked
    not_checked = next(line for line in out.splitlines() if line.startswith("not checked:"))
    assert "checkpoint.resume" in not_checked and "loss tokens" in not_checked


def test_dry_run_prints_the_activation_bytes_of_the_configured_mode(capsys):
    code, out, _ = dry_run(capsys, ["tiny_cpu", *TINY, "activation.mode=tokenwise", "activation.alpha=auto"])
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("activations held for backward"))
    cfg = compose("tiny_cpu", [*TINY, "activation.mode=tokenwise"])
    low, high = activation_bytes(cfg, meta_model(cfg, 4096).config).offloaded
    assert low < high
    assert "alpha=auto" in line and "first step" in line
    assert f"{format_bytes(low)} (alpha 0)" in line and f"{format_bytes(high)} (alpha 1)" in line
    code, out, _ = dry_run(capsys, ["tiny_cpu", *TINY, "activation.mode=none"])
    assert "activations held for backward (activation.mode=none): device " in out


def figures(mode: str, **activation):
    cfg = compose(
        "tiny_cpu",
        [*TINY, f"activation.mode={mode}", *(f"activation.{k}={v}" for k, v in activation.items())],
    )
    return activation_bytes(cfg, meta_model(cfg, 4096).config)


def test_activation_bytes_follow_each_mode():
    none, recompute, offload = figures("none"), figures("recompute"), figures("offload")
    assert none.offloaded == recompute.offloaded == (0, 0)
    assert 0 < recompute.device < none.device  # layer inputs only
    assert offload.device == 0 and offload.offloaded == (none.device, none.device)
    keep_all = figures("tokenwise", alpha=1, keep_last=4)  # 4 layers, none offloaded
    assert keep_all.device == none.device and keep_all.offloaded == (0, 0)
    half = figures("tokenwise", alpha=0.5, keep_last=1)
    zero, one = figures("tokenwise", alpha=0, keep_last=1), figures("tokenwise", alpha=1, keep_last=1)
    assert half.device == zero.device == one.device == none.device // 4  # the last layer
    assert zero.offloaded[0] < half.offloaded[0] < one.offloaded[0]
    assert one.offloaded[0] + one.device == none.device  # everything saved, somewhere


@pytest.mark.parametrize("alpha", [0, 1])
def test_tokenwise_host_bytes_match_the_executor(tmp_path, alpha):
    """The estimate against what the token-wise executor offloaded in a real step: the whole
    tensors (layer input, attention output, logsumexp) exactly; at alpha 1, all saved rows within 2%."""
    cfg = compose(
        "tiny_cpu",
        [
            *TINY,
            "train.steps=1",
            "optim.warmup_steps=0",
            "logging.progress=false",
            "logging.peak_flops=1e12",
            "checkpoint.enabled=false",
            "activation.mode=tokenwise",
            f"activation.alpha={alpha}",
            "activation.keep_last=1",
            f"output_dir={tmp_path}",
        ],
    )
    job = prepare(cfg)
    try:
        measured = job.run()[0]["host_bytes"]
        estimate = activation_bytes(cfg, job.model.config).offloaded[0]
    finally:
        job.close()
    if alpha == 0:
        assert estimate == measured
    else:
        assert estimate == pytest.approx(measured, rel=0.02)

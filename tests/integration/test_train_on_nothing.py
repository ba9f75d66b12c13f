"""Training on nothing is an error, never "done": a tokenizer that encodes the data to no tokens
(a model directory without tokenizer files), data without loss tokens, and a step in which no rank
had a loss token."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_hf_model

from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose
from longtrain.trainer.data import IGNORE_INDEX
from longtrain.trainer.train import prepare

SMALL = [
    "train.steps=2",
    "train.seq_len=64",
    "train.grad_accum=1",
    "data.micro_batch_size=1",
    "train.dtype=float32",
    "train.device=cpu",
    "optim.warmup_steps=0",
    "activation.mode=none",
    "logging.progress=false",
    "logging.peak_flops=1e12",
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_one_line_error(capsys, argv, *needles) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    # stderr also holds the progress bars of datasets and transformers
    lines = [line for line in captured.err.splitlines() if line.startswith("longtrain")]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("longtrain: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def qwen2_without_tokenizer(tmp_path_factory):
    """A Qwen2 model directory as `save_pretrained` writes it without a tokenizer: config.json,
    generation_config.json and model.safetensors only."""
    path = tmp_path_factory.mktemp("qwen2_no_tokenizer")
    tiny_hf_model("qwen2", dtype=torch.float32).save_pretrained(path)
    assert not list(path.glob("tokenizer*")) and not list(path.glob("vocab*"))
    return path


@pytest.mark.parametrize("options", [[], ["--dry-run"]])
def test_model_dir_without_tokenizer_files_is_an_error_naming_both_keys(
    capsys, tmp_path, qwen2_without_tokenizer, options
):
    """qwen2_finetune's default data.tokenizer is model.path: without tokenizer files there,
    transformers builds a tokenizer of one token that encodes every document to nothing."""
    data = write_jsonl(tmp_path / "sft.jsonl", ["Some text to fine-tune on.", "And another document."] * 8)
    out = tmp_path / "out"
    line = assert_one_line_error(
        capsys,
        [
            "train",
            "qwen2_finetune",
            f"model.path={qwen2_without_tokenizer}",
            f"data.path={data}",
            *SMALL,
            f"output_dir={out}",
            *options,
        ],
        "data.tokenizer",
        "model.path",
        str(qwen2_without_tokenizer),
    )
    assert "tokenizer files" in line
    assert not (out / "metrics.jsonl").exists()


def test_data_without_loss_tokens_is_an_error(capsys, tmp_path):
    """Documents of one token each (no eos appended) have no next token to predict."""
    data = write_jsonl(tmp_path / "one_token.jsonl", ["a", "b", "c", "d"] * 20)
    out = tmp_path / "out"
    line = assert_one_line_error(
        capsys,
        [
            "train",
            "tiny_cpu",
            "data.source=jsonl",
            f"data.path={data}",
            "data.add_eos=false",
            *SMALL,
            f"output_dir={out}",
        ],
        "no loss tokens",
        "data.path",
    )
    assert "data.add_eos" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_step_without_loss_tokens_is_reported(capsys, tmp_path):
    """A step whose micro-batches hold no target on any rank trains nothing: it says so."""
    cfg = compose("tiny_cpu", [*SMALL, "train.steps=3", "train.log_every=1", f"output_dir={tmp_path}"])
    job = prepare(cfg)
    real_next, calls = type(job.loader).__next__, []

    def next_batch(loader):
        mb = real_next(loader)
        calls.append(1)
        if len(calls) == 2:  # step 2: every label ignored
            return type(mb)(mb.input_ids, torch.full_like(mb.labels, IGNORE_INDEX), mb.position_ids)
        return mb

    try:
        type(job.loader).__next__ = next_batch  # type: ignore[method-assign]
        capsys.readouterr()
        logged = job.run()
    finally:
        type(job.loader).__next__ = real_next  # type: ignore[method-assign]
        job.close()
    assert [r["loss_tokens"] == 0 for r in logged] == [False, True, False]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "no loss tokens" in warnings[0], warnings

"""``longtrain export RUN_DIR OUT_DIR [--step N]``: a training run back to a Hugging Face directory
that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load, with the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_hf_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose
from longtrain.trainer.data import load_tokenizer
from longtrain.trainer.train import prepare

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TEXT = "Exported: the pass key is 48213.\n\n  déjà vu, x = [1, 2]"
RUN = [
    "train.steps=2",
    "train.seq_len=64",
    "train.grad_accum=1",
    "train.dtype=float64",
    "train.device=cpu",
    "data.micro_batch_size=1",
    "optim.warmup_steps=0",
    "activation.mode=none",
    "checkpoint.every=1",
    "checkpoint.keep=0",
    "logging.progress=false",
    "logging.peak_flops=1e12",
]


def train_run(recipe: str, overrides: list[str]):
    """Train; return the trained model (the job's CausalLM, closed)."""
    job = prepare(compose(recipe, [*RUN, *overrides]))
    try:
        job.run()
    finally:
        job.close()
    return job.model


def export(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("longtrain")]


def assert_same_logits(exported, trained, vocab_size: int) -> None:
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained.to_hf()(input_ids=ids).logits  # the HF forward over the trained weights
        adapted = trained(input_ids=ids).logits  # longtrain's forward
        logits = exported(input_ids=ids).logits
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, adapted, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    model = train_run("tiny_cpu", ["model.num_layers=2", "model.hidden_size=64", f"output_dir={run_dir}"])
    return run_dir, model


def test_export_loads_in_transformers_with_the_trained_logits(capsys, tmp_path, tiny_run):
    run_dir, trained = tiny_run
    out = tmp_path / "hf"
    code, stdout, err = export(capsys, run_dir, out)
    assert code == 0, err
    assert "step-000002" in stdout and str(out) in stdout  # default: the newest checkpoint
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float64)
    assert_same_logits(model.eval(), trained.eval(), model.config.vocab_size)

    # the bundled tokenizer, as AutoTokenizer loads it: the same ids and special tokens
    bundled = load_tokenizer("bundled")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert ids == bundled.encode(TEXT) and tokenizer.decode(ids) == TEXT
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (bundled.eos_id, bundled.bos_id)
    generation = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert generation.eos_token_id == bundled.eos_id == model.config.eos_token_id


def test_export_of_an_older_step(capsys, tmp_path, tiny_run):
    run_dir, _ = tiny_run
    out = tmp_path / "step1"
    out.mkdir()  # an existing empty directory is fine
    code, stdout, err = export(capsys, run_dir, out, "--step", 1)
    assert code == 0, err
    exported = load_file(out / "model.safetensors")
    saved = load_file(run_dir / "checkpoints" / "step-000001" / "model.safetensors")
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[name], saved[name]) for name in saved)


def test_export_of_a_qwen2_model_dir_keeps_its_tokenizer(capsys, tmp_path):
    """qwen2_finetune from a local model directory with HF tokenizer files: the export holds the
    trained weights, the model's config and its tokenizer."""
    model_dir = tmp_path / "qwen2"
    # transformers loads a tokenizer in a qwen2 directory as Qwen2Tokenizer, which adds <|endoftext|>
    tiny_hf_model("qwen2", dtype=torch.float32, vocab_size=4104).save_pretrained(model_dir)
    bundled = load_tokenizer("bundled")
    PreTrainedTokenizerFast(
        tokenizer_object=bundled._backend, eos_token="<|eos|>", bos_token="<|bos|>", pad_token="<|pad|>"
    ).save_pretrained(model_dir)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": f"{TEXT} {i}"}) + "\n" for i in range(16)))
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    trained = train_run(
        "qwen2_finetune", [f"model.path={model_dir}", f"data.path={data}", f"output_dir={run_dir}"]
    )

    code, _, err = export(capsys, run_dir, out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float64)
    assert model.config.model_type == "qwen2"
    assert_same_logits(model.eval(), trained.eval(), 4104)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.decode(tokenizer.encode(TEXT, add_special_tokens=False)) == TEXT


def test_export_errors_are_one_line_and_lose_nothing(capsys, tmp_path, tiny_run):
    run_dir, _ = tiny_run

    def error(*argv, needles):
        code, stdout, err = export(capsys, *argv)
        assert code == 2 and stdout == ""
        assert len(err) == 1 and err[0].startswith("longtrain: error: "), err
        for needle in needles:
            assert needle in err[0], err[0]

    error(tmp_path / "nothing", tmp_path / "a", needles=[str(tmp_path / "nothing"), "config.yaml"])
    error(run_dir, tmp_path / "b", "--step", 7, needles=["step 7", "1, 2"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    error(run_dir, busy, needles=[str(busy), "not empty"])
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"

    no_checkpoints = tmp_path / "no_ckpt"
    no_checkpoints.mkdir()
    (no_checkpoints / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    error(no_checkpoints, tmp_path / "c", needles=["no complete checkpoint", "checkpoint.enabled"])

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (damaged / "checkpoints").mkdir()
    copy = damaged / "checkpoints" / "step-000001"
    copy.mkdir()
    for f in (run_dir / "checkpoints" / "step-000001").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    error(damaged, tmp_path / "d", "--step", 1, needles=["model.safetensors", "sha256"])
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))  # nor its staging directory

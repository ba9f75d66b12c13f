"""Recipe composition, config validation and the CLI's user-error contract.

User errors must be one line that names the key (or file) to change; the CLI prints it as
``longtrain: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf

from longtrain.checkpoint import CheckpointConfig
from longtrain.offload import ActivationConfig
from longtrain.optim import OptimConfig
from longtrain.parallel import ParallelConfig
from longtrain.trainer.cli import main
from longtrain.trainer.compose import RECIPES_DIR, available_recipes, compose, to_yaml
from longtrain.trainer.config import ConfigError, JobConfig, LoggingConfig, ModelConfig, TrainConfig
from longtrain.trainer.data import DataConfig

RECIPES = ("llama3_8b_128k", "memo_7b_1m", "qwen2_finetune", "tiny_cpu")


def config_error(recipe: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        compose(recipe, overrides)
    message = str(err.value)
    assert message and "\n" not in message, f"error must be one line: {message!r}"
    return message


# --- composition ---------------------------------------------------------------------------------


def test_bundled_recipes_are_the_expected_ones():
    assert available_recipes() == sorted(RECIPES)


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_bundled_recipe_composes_with_its_own_values(recipe):
    cfg = compose(recipe)
    assert isinstance(cfg, JobConfig)
    raw = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / f"{recipe}.yaml"), resolve=False)
    composed = dataclasses.asdict(cfg)
    checked = 0
    for key, value in leaves(raw):
        if isinstance(value, str) and "${" in value:
            continue  # interpolations: see test_recipe_interpolation
        got = composed
        for part in key.split("."):
            got = got[part]
        assert got == value, f"{recipe}: {key} = {got!r}, recipe says {value!r}"
        checked += 1
    assert checked > 10


def test_recipe_interpolation_resolves_after_overrides():
    cfg = compose("qwen2_finetune", ["model.path=/models/q"])
    assert cfg.model.family == "qwen2"
    assert cfg.data.tokenizer == "/models/q"  # data.tokenizer: ${model.path}


def test_overrides_apply():
    cfg = compose(
        "tiny_cpu", ["train.steps=5", "optim.warmup_steps=2", "optim.lr=0.5", "model.sliding_window=null"]
    )
    assert cfg.train.steps == 5 and cfg.optim.warmup_steps == 2
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.model.sliding_window is None
    cfg = compose("tiny_cpu", ["optim.lr=1"])  # an int for a float field is coerced
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_delete_override_resets_to_default():
    assert compose("tiny_cpu").train.steps == 120
    assert compose("tiny_cpu", ["~train.steps"]).train.steps == JobConfig().train.steps == 100
    assert compose("tiny_cpu", ["~data.micro_batch_size"]).data.micro_batch_size == 1


def test_yaml_round_trip(tmp_path):
    cfg = compose("tiny_cpu", ["train.steps=7", "optim.warmup_steps=3"])
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(cfg))
    assert compose(str(path)) == cfg
    assert dataclasses.asdict(compose(str(path))) == dataclasses.asdict(cfg)


def test_user_yaml_file_is_a_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 3\noptim:\n  warmup_steps: 0\n")
    cfg = compose(str(path))
    assert cfg.train.steps == 3 and cfg.model == JobConfig().model


# --- one-line errors that name the key ------------------------------------------------------------


def test_unknown_key_lists_close_matches():
    message = config_error("tiny_cpu", ["train.stepz=3"])
    assert "'train.stepz'" in message and "train.steps" in message


def test_unknown_section_key():
    message = config_error("tiny_cpu", ["modle.hidden_size=3"])
    assert "modle.hidden_size" in message


def test_unknown_recipe_lists_available():
    message = config_error("tiny_cp", [])
    assert "'tiny_cp'" in message and "tiny_cpu" in message
    for name in RECIPES:
        assert name in message


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(str(missing), [])
    assert str(missing) in message and "does not exist" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seq_len=abc", "train.seq_len must be int, got 'abc'"),
        ("train.seq_len=0", "train.seq_len must be a positive int, got 0"),
        ("train.seq_len=-3", "train.seq_len must be a positive int, got -3"),
        ("train.seq_len=true", "train.seq_len must be int, got True"),
        ("train.dtype=fp16", "train.dtype must be one of float32, bfloat16, float64, got 'fp16'"),
        ("train.device=tpu", "train.device must be one of"),
        ("activation.alpha=1.5", "activation.alpha must be in [0, 1], got 1.5"),
        ("activation.alpha=most", "activation.alpha must be a number in [0, 1] or 'auto'"),
        ("activation.mode=swap", "activation.mode must be one of"),
        ("optim.warmup_steps=500", "optim.warmup_steps (500) exceeds train.steps (120)"),
        ("optim.name=lion", "optim.name must be one of adamw, sgd"),
        ("parallel.context_parallel=2", "parallel.context_parallel=2 needs parallel.mode=cp"),
        ("parallel.mode=tp", "parallel.mode must be one of dp, cp, hdp, got 'tp'"),
        ("parallel.cp_impl=star", "parallel.cp_impl must be one of ring, ulysses, got 'star'"),
        ("parallel.token_capacity=64", "parallel.token_capacity=64 applies to parallel.mode=hdp only"),
        ("parallel.token_capacity=0", "parallel.token_capacity must be a positive int, got 0"),
        ("parallel.hdp_balance=false", "parallel.hdp_balance=false applies to parallel.mode=hdp only"),
        ("parallel.hdp_balance=2", "parallel.hdp_balance must be true or false, got 2"),
        ("train.global_batch_tokens=4096", "train.global_batch_tokens=4096 applies to parallel.mode=hdp"),
        ("model.num_kv_heads=3", "model.num_heads (4) must be a multiple of model.num_kv_heads (3)"),
        ("model.family=gpt2", "model.family must be one of llama, qwen2, mistral"),
        ("model.sliding_window=64", "model.sliding_window=64 < train.seq_len=512"),
        ("checkpoint.every=0", "checkpoint.every must be a positive int"),
        ("data.micro_batch_size=0", "data.micro_batch_size must be a positive int, got 0"),
        ("model.hidden_size=null", "model.hidden_size must not be null"),
        ("train.steps=[1,2]", "train.steps must be int"),
        ("train.eval_every=-1", "train.eval_every must be an int >= 0, got -1"),
        ("train.eval_batches=0", "train.eval_batches must be a positive int, got 0"),
        ("train.eval_every=10", "train.eval_every=10 needs a validation split: set data.val_fraction"),
        ("activation.trim_heap=maybe", "activation.trim_heap must be true, false or 'auto', got 'maybe'"),
    ],
)
def test_invalid_value_is_one_line_naming_the_key(override, expected):
    assert expected in config_error("tiny_cpu", [override])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["parallel.mode=hdp", "parallel.shard=deepspeed"],
            "parallel.shard=deepspeed with parallel.mode=hdp is not supported",
        ),
        (
            ["parallel.mode=hdp", "train.global_batch_tokens=1000"],
            "train.global_batch_tokens=1000 is not a multiple of train.seq_len=512",
        ),
    ],
)
def test_bad_parallel_combination_is_one_line_naming_the_key(overrides, expected):
    assert expected in config_error("tiny_cpu", overrides)


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (TrainConfig, {"steps": 0}, "train.steps must be a positive int, got 0"),
        (TrainConfig, {"seq_len": 2.5}, "train.seq_len must be int, got 2.5"),
        (ModelConfig, {"hidden_size": True}, "model.hidden_size must be int, got True"),
        (ModelConfig, {"rope_theta": 0.0}, "model.rope_theta must be a number > 0, got 0.0"),
        (LoggingConfig, {"progress": "yes"}, "logging.progress must be true or false, got 'yes'"),
        (DataConfig, {"val_fraction": -0.5}, "data.val_fraction must be in [0, 1), got -0.5"),
        (OptimConfig, {"betas": [0.9, 1.5]}, "optim.betas[1] must be in [0, 1), got 1.5"),
        (OptimConfig, {"lr": "fast"}, "optim.lr must be float, got 'fast'"),
        (ActivationConfig, {"alpha": [1]}, "activation.alpha must be a number in [0, 1] or 'auto', got [1]"),
        (
            ParallelConfig,
            {"data_parallel": 0},
            "parallel.data_parallel must be -1 (world size) or a positive int",
        ),
        (CheckpointConfig, {"keep": -1}, "checkpoint.keep must be an int >= 0, got -1"),
        (JobConfig, {"seed": "x"}, "seed must be int, got 'x'"),
        (JobConfig, {"train": 5}, "train must be a TrainConfig section, got 5"),
    ],
)
def test_every_config_dataclass_raises_config_error_naming_the_key(cls, kwargs, expected):
    """Built directly (not through compose), every package's config checks its fields the same way."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        cls(**kwargs)


def test_int_for_a_float_field_becomes_a_float():
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)
    assert OptimConfig(betas=[0, 0]).betas == [0.0, 0.0]


def test_unknown_nested_key_in_user_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: 3\n  seqlen: 128\noptim:\n  warmup_steps: 0\n")
    message = config_error(str(path), [])
    assert "'train.seqlen'" in message and "train.seq_len" in message


def test_non_mapping_section_in_user_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train: 5\n")
    assert "train must be a mapping" in config_error(str(path), [])


def test_sweep_override_rejected():
    message = config_error("tiny_cpu", ["train.steps=1,2"])
    assert "train.steps=1,2" in message and "sweep" in message


def test_malformed_override():
    assert "bad override" in config_error("tiny_cpu", ["train.steps"])


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_cli_error(capsys, argv: list[str], *needles: str) -> str:
    code, out, err = run_cli(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longtrain: error: "), err
    assert out == ""
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "tiny_cpu", "train.stepz=3"], ("train.stepz", "train.steps")),
        (["train", "tiny_cp"], ("unknown recipe", "tiny_cpu")),
        (["train", "/nonexistent/dir/job.yaml"], ("/nonexistent/dir/job.yaml",)),
        (["train", "tiny_cpu", "train.seq_len=abc"], ("train.seq_len",)),
        (["train", "tiny_cpu", "activation.alpha=1.5"], ("activation.alpha",)),
        (["train", "tiny_cpu", "train.steps=1,2"], ("sweep",)),
        (["train", "tiny_cpu", "train.stepz=3", "--nproc", "2"], ("train.stepz",)),
        (["train", "tiny_cpu", "--nproc", "0"], ("--nproc",)),
        (["train", "tiny_cpu", "train.stepz=3", "--dry-run"], ("train.stepz",)),
    ],
)
def test_cli_user_errors(capsys, argv, needles):
    assert_cli_error(capsys, argv, *needles)


def test_cli_internal_value_error_keeps_its_traceback(capsys, monkeypatch):
    """Only ConfigError is a user error: a ValueError from a bug propagates (a traceback and exit
    status 1 from the interpreter), it is not printed as a one-line 'longtrain: error'."""
    import longtrain.trainer.train as train_mod

    def broken(cfg):
        raise ValueError("an internal bug")

    monkeypatch.setattr(train_mod, "prepare", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", "tiny_cpu"])
    assert "longtrain: error" not in capsys.readouterr().err


def test_cli_recipes_lists_names(capsys):
    code, out, _ = run_cli(capsys, ["recipes"])
    assert code == 0
    assert out.split() == sorted(RECIPES)


def test_cli_dry_run(capsys):
    code, out, err = run_cli(capsys, ["train", "tiny_cpu", "--dry-run"])
    assert code == 0, err
    assert out.rstrip().endswith("dry run: config is valid")
    assert "output_dir: outputs/tiny_cpu" in out  # the composed config is printed


@pytest.mark.parametrize("recipe", ["llama3_8b_128k", "memo_7b_1m"])
def test_cli_dry_run_of_a_recipe_without_its_data_prints_sizes_then_names_the_paths(capsys, recipe):
    """The large recipes point at data and tokenizer paths that do not exist here: the sizes are
    printed, then one error line names data.path and data.tokenizer (the job would stop there)."""
    code, out, err = run_cli(capsys, ["train", recipe, "--dry-run"])
    assert code == 2
    assert "output_dir: outputs/" + recipe in out and "model states" in out
    assert "config is valid" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longtrain: error: dry run: data.path"), err
    assert "data.tokenizer" in lines[0]


def test_cli_overrides_may_follow_options(capsys):
    """`longtrain train tiny_cpu --nproc 2 train.steps=3`: overrides after an option still apply."""
    code, out, err = run_cli(
        capsys, ["train", "tiny_cpu", "--dry-run", "train.steps=7", "optim.warmup_steps=1"]
    )
    assert code == 0, err
    assert "  steps: 7\n" in out and "  warmup_steps: 1\n" in out
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error for unknown options
        main(["train", "tiny_cpu", "--dry-run", "train.steps=7", "--bogus"])
    assert exit_info.value.code == 2


def test_dry_run_parameter_count_is_exact(capsys):
    """The report's parameter count equals the count of the model the trainer builds."""
    from longtrain.trainer.model.hf import build_hf_model

    cfg = compose("tiny_cpu", ["model.vocab_size=4096"])
    model = build_hf_model(cfg.model, vocab_size=4096, seq_len=cfg.train.seq_len)
    n = sum(p.numel() for p in model.parameters())
    code, out, _ = run_cli(capsys, ["train", "tiny_cpu", "model.vocab_size=4096", "--dry-run"])
    assert code == 0
    assert f"{n / 1e6:.1f}M parameters" in out


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2")
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    assert list(path.glob("*.safetensors"))
    return path


def test_cli_dry_run_qwen2_finetune_with_local_model(capsys, tiny_qwen2_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"text": "a document"}\n')
    code, out, err = run_cli(
        capsys,
        [
            "train",
            "qwen2_finetune",
            f"model.path={tiny_qwen2_dir}",
            f"data.path={data}",
            "data.tokenizer=bundled",
            "--dry-run",
        ],
    )
    assert code == 0, err
    assert "model: qwen2, 2 layers, hidden 32" in out
    assert out.rstrip().endswith("dry run: config is valid")


def test_cli_dry_run_qwen2_finetune_without_model_names_model_path(capsys, tmp_path):
    assert_cli_error(capsys, ["train", "qwen2_finetune", f"model.path={tmp_path}", "--dry-run"], "model.path")


def test_cli_missing_data_file_names_data_path(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    line = assert_cli_error(
        capsys,
        [
            "train",
            "tiny_cpu",
            "data.source=jsonl",
            f"data.path={missing}",
            "train.steps=20",
            "logging.progress=false",
            f"output_dir={tmp_path / 'out'}",
        ],
        "data.path",
    )
    assert str(missing) in line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_cli_data_source_without_path(capsys, tmp_path):
    assert_cli_error(
        capsys, ["train", "tiny_cpu", "data.source=jsonl", f"output_dir={tmp_path}"], "data.path is required"
    )


def test_cli_train_without_recipe_says_the_recipe_is_missing(capsys):
    """Overrides are optional: the one thing `longtrain train` needs is a recipe."""
    line = assert_cli_error(capsys, ["train"], "recipe", "longtrain recipes")
    assert "overrides" not in line


BAD_YAML = "train:\n  steps: 3\n   seq_len: 4\n"  # the third line's indent breaks the mapping


@pytest.mark.parametrize("options", [[], ["--dry-run"], ["--nproc", "2"]])
def test_cli_yaml_syntax_error_is_one_line_with_file_line_and_column(capsys, tmp_path, options):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    line = assert_cli_error(capsys, ["train", str(bad), *options], str(bad))
    assert "line 3, column 11" in line  # 1-based, as editors count

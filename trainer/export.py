"""``longtrain export RUN_DIR OUT_DIR [--step N]``: a training run's checkpoint as a Hugging Face
model directory that ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained`` load.

    OUT_DIR/config.json, generation_config.json   model.path's config, or one built from model.*
    OUT_DIR/model.safetensors                      the checkpoint's parameters (their HF names)
    OUT_DIR/tokenizer.json, tokenizer_config.json  data.tokenizer (the bundled one wrapped for transformers)

RUN_DIR is a training ``output_dir``: its ``config.yaml`` says how the model and the tokenizer were
built, its checkpoints (``checkpoint.dir``, default ``RUN_DIR/checkpoints``) hold the weights, read
through ``checkpoint.find_checkpoint`` and ``checkpoint.load_weights``. The directory is written
next to OUT_DIR and renamed into place, so a failed export leaves nothing behind and an existing
non-empty OUT_DIR is never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from longtrain.checkpoint import find_checkpoint, load_weights
from longtrain.planner.estimate import model_config
from longtrain.trainer.data import Tokenizer, load_tokenizer

from .compose import compose
from .config import ConfigError, JobConfig
from .model.adapter import adapt
from .train import architecture, param_dtype


class ExportError(ConfigError):
    """A RUN_DIR or OUT_DIR that cannot be used: the message names it and what to change."""


def _run_config(run_dir: Path) -> JobConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{str(run_dir)!r} has no config.yaml; RUN_DIR must be a training output_dir")
    return compose(str(path))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"OUT_DIR {str(out_dir)!r} exists and is not empty; pass a new or empty directory")


def _tokenizer(cfg: JobConfig, run_dir: Path) -> Tokenizer:
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except ConfigError as e:  # load_tokenizer's user errors, e.g. a relative path from elsewhere
        raise ExportError(
            f"{str(e).splitlines()[0]} (data.tokenizer of {str(run_dir / 'config.yaml')!r}; "
            "run the export from the directory training ran in)"
        ) from None


def _hf_model(cfg: JobConfig, tokenizer: Tokenizer):
    """The job's model architecture (weights about to be replaced), with the tokenizer's special
    tokens in its config and generation config when the config was built from model.* sizes."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = model_config(cfg, tokenizer.vocab_size)
    if not cfg.model.path:  # model.path's config already names its own tokenizer's special tokens
        config.bos_token_id, config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        config.pad_token_id = tokenizer.pad_id
    model = AutoModelForCausalLM.from_config(config, dtype=param_dtype(cfg))
    if cfg.model.path and (Path(cfg.model.path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(cfg.model.path, local_files_only=True)
    else:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write checkpoint ``step`` (default: the newest complete one) of ``run_dir`` to ``out_dir``
    in Hugging Face format; returns the checkpoint directory it read."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out_dir(out_dir)
    cfg = _run_config(run_dir)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    checkpoint = find_checkpoint(root, step)
    tokenizer = _tokenizer(cfg, run_dir)
    model = _hf_model(cfg, tokenizer)
    hint = f"was {str(run_dir / 'config.yaml')!r} changed after training?"
    load_weights(checkpoint, model, architecture(adapt(model)), hint=hint)

    staging = out_dir.with_name(f".{out_dir.name}.export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty: checked above
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint

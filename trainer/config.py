"""The job config: one typed dataclass per package, assembled here.

    output_dir, seed
    train.*       TrainConfig        (this module)
    model.*       ModelConfig        (this module)
    data.*        DataConfig         (trainer/data/config.py)
    optim.*       OptimConfig        (optim/config.py)
    activation.*  ActivationConfig   (offload/config.py)
    parallel.*    ParallelConfig     (parallel/config.py)
    checkpoint.*  CheckpointConfig   (checkpoint/config.py)
    logging.*     LoggingConfig      (this module)
    planner.*     PlannerConfig      (this module)

Composition (``compose.py``) fills these from a recipe YAML plus Hydra-syntax overrides. Every
dataclass checks its fields with ``longtrain.config_checks`` (type, bounds, choices) and its
cross-field rules in ``__post_init__``; each error is a ``ConfigError`` naming the key to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longtrain.checkpoint.config import CheckpointConfig
from longtrain.config_checks import ConfigError, check_fields, option
from longtrain.offload.config import ActivationConfig
from longtrain.optim.config import OptimConfig
from longtrain.parallel.config import ParallelConfig
from longtrain.parallel.zero3 import Zero3Spec, check_spec
from longtrain.trainer.data.config import DataConfig
from longtrain.trainer.model.adapter import SUPPORTED_FAMILIES
from longtrain.trainer.model.attention import BACKENDS

__all__ = ["ConfigError", "JobConfig", "LoggingConfig", "ModelConfig", "PlannerConfig", "TrainConfig"]

DTYPES = ("float32", "bfloat16", "float64")  # torch dtype names
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """steps: optimizer steps.  seq_len: tokens per packed row.  dtype: float32 | bfloat16
    (autocast, fp32 master weights) | float64 (exactness checks).  grad_accum: micro-batches per
    step.  log_every: steps between metric lines.  device: auto | cpu | cuda.
    eval_every: steps between validation passes over the held-out split (needs
    data.val_fraction > 0; 0 = only after the last step).  eval_batches: micro-batches per rank
    per validation pass (null = the whole split).
    global_batch_tokens: tokens of one optimizer step over all ranks, a multiple of seq_len
    (parallel.mode=hdp: the same on any number of ranks; null = seq_len x data.micro_batch_size x
    grad_accum). Modes dp and cp take grad_accum micro-batches per data-parallel rank."""

    steps: int = option(100, min=1)
    seq_len: int = option(512, min=1)
    dtype: str = option("float32", choices=DTYPES)
    grad_accum: int = option(1, min=1)
    log_every: int = option(10, min=1)
    device: str = option("auto", choices=DEVICES)
    eval_every: int = option(0, min=0)
    eval_batches: int | None = option(None, min=1)
    global_batch_tokens: int | None = option(None, min=1)

    def __post_init__(self) -> None:
        check_fields(self, "train")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype`` (the names are torch's)."""
        return getattr(torch, self.dtype)


@dataclass
class ModelConfig:
    """Either ``path`` (a local HF model directory with config.json + safetensors) or a config
    ``family`` with sizes (random init, no download). vocab_size null = the tokenizer's size;
    max_position_embeddings null = max(train.seq_len, 2048). attention: the attention core."""

    family: str = option("llama", choices=SUPPORTED_FAMILIES)
    path: str | None = None
    hidden_size: int = option(128, min=1)
    num_layers: int = option(2, min=1)
    num_heads: int = option(4, min=1)
    num_kv_heads: int = option(2, min=1)
    intermediate_size: int | None = option(None, min=1)
    head_dim: int | None = option(None, min=1)
    vocab_size: int | None = option(None, min=1)
    max_position_embeddings: int | None = option(None, min=1)
    rope_theta: float = option(10000.0, min=0.0, min_open=True)
    rms_norm_eps: float = option(1e-5, min=0.0)
    tie_embeddings: bool = False
    sliding_window: int | None = option(None, min=1)
    attention: str = option("auto", choices=BACKENDS)
    init_std: float = option(0.02, min=0.0)

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}), "
                "or set model.head_dim"
            )

    def check_path(self) -> None:
        """``model.path`` is a local HF directory holding a supported model: config.json of a
        supported family and weights (run when the model is built, not at composition)."""
        if not self.path:
            return
        path = Path(self.path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"model.path {str(path)!r} has no config.json; point model.path at a local HF model directory"
            )
        family = json.loads(config_file.read_text()).get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"model.path {str(path)!r} holds a {family!r} model; supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"model.path {str(path)!r} has no *.safetensors weights")


@dataclass
class LoggingConfig:
    """progress: tqdm bar on rank 0.  wandb: also log to Weights & Biases (honours WANDB_MODE).
    peak_flops: FLOP/s per device for MFU (null = detected: GPU table, CPU estimate)."""

    progress: bool = True
    wandb: bool = False
    wandb_project: str = option("longtrain", nonempty=True)
    wandb_run_name: str | None = None
    peak_flops: float | None = option(None, min=0.0, min_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "logging")


@dataclass
class PlannerConfig:
    """auto: plan the activation memory (and the optimizer tier and sharding) before training, as
    ``longtrain plan RECIPE hardware=HARDWARE --write`` would, write the plan under output_dir and
    run it; keys set on the command line stay as set (planner/cli.py ``plan_for_training``).
    hardware: the description planned for (cpu: this machine, measured)."""

    auto: bool = False
    hardware: str = option("cpu", nonempty=True)

    def __post_init__(self) -> None:
        check_fields(self, "planner")


@dataclass
class JobConfig:
    output_dir: str = option("outputs/run", nonempty=True)
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds train.steps ({self.train.steps}); lower it"
            )
        if self.train.eval_every and self.data.val_fraction == 0:
            raise ConfigError(
                f"train.eval_every={self.train.eval_every} needs a validation split: set data.val_fraction "
                "(e.g. 0.05) or train.eval_every=0"
            )
        tokens = self.train.global_batch_tokens
        if tokens is not None and self.parallel.mode != "hdp":
            raise ConfigError(
                f"train.global_batch_tokens={tokens} applies to parallel.mode=hdp; in mode {self.parallel.mode} a "
                "step is data.micro_batch_size x train.grad_accum rows per data-parallel rank: set it to null"
            )
        if tokens is not None and tokens % self.train.seq_len:
            raise ConfigError(
                f"train.global_batch_tokens={tokens} is not a multiple of train.seq_len={self.train.seq_len}; "
                "a step takes whole packed rows"
            )
        if self.model.sliding_window is not None and self.model.sliding_window < self.train.seq_len:
            raise ConfigError(
                f"model.sliding_window={self.model.sliding_window} < train.seq_len={self.train.seq_len}: "
                "sliding-window attention is not supported; set model.sliding_window=null"
            )
        if self.checkpoint.snapshot_every is not None and self.parallel.shard != "none":
            raise ConfigError(
                f"checkpoint.snapshot_every={self.checkpoint.snapshot_every} with parallel.shard={self.parallel.shard}: "
                "snapshots of sharded states are not built yet; set checkpoint.snapshot_every=null or parallel.shard=none"
            )
        if self.parallel.shard == "deepspeed":
            check_spec(
                Zero3Spec(self.optim, self.train.grad_accum, self.data.micro_batch_size, self.train.dtype)
            )

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

Composition (``compose.py``) fills these from a recipe YAML plus Hydra-syntax overrides; every
field check lives in a ``__post_init__`` whose error names the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.checkpoint.config import CheckpointConfig
from longtrain.offload.config import ActivationConfig
from longtrain.optim.config import OptimConfig
from longtrain.parallel.config import ParallelConfig
from longtrain.trainer.data.config import DataConfig

DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
FAMILIES = ("llama", "qwen2", "mistral")
ATTENTION = ("auto", "cpu_flash", "sdpa", "flash_attn", "reference")


class ConfigError(ValueError):
    """A user error in the config: the message is one line naming the key or file to fix."""


def _positive_int(key: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive int, got {value!r}")


@dataclass
class TrainConfig:
    """steps: optimizer steps.  seq_len: tokens per packed row.  dtype: float32 | bfloat16
    (autocast, fp32 master weights) | float64 (exactness checks).  grad_accum: micro-batches per
    step.  log_every: steps between metric lines.  device: auto | cpu | cuda.
    eval_every: steps between validation passes over the held-out split (needs
    data.val_fraction > 0; 0 = only after the last step).  eval_batches: micro-batches per rank
    per validation pass (null = the whole split)."""

    steps: int = 100
    seq_len: int = 512
    dtype: str = "float32"
    grad_accum: int = 1
    log_every: int = 10
    device: str = "auto"
    eval_every: int = 0
    eval_batches: int | None = None

    def __post_init__(self) -> None:
        for key in ("steps", "seq_len", "grad_accum", "log_every"):
            _positive_int(f"train.{key}", getattr(self, key))
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be an int >= 0, got {self.eval_every!r}")
        _positive_int("train.eval_batches", self.eval_batches, allow_none=True)
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"train.device must be one of {', '.join(DEVICES)}, got {self.device!r}")


@dataclass
class ModelConfig:
    """Either ``path`` (a local HF model directory with config.json + safetensors) or a config
    ``family`` with sizes (random init, no download). vocab_size null = the tokenizer's size;
    max_position_embeddings null = max(train.seq_len, 2048). attention: the attention core."""

    family: str = "llama"
    path: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None
    attention: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(
                f"model.attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}"
            )
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            _positive_int(f"model.{key}", getattr(self, key))
        for key in (
            "intermediate_size",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "sliding_window",
        ):
            _positive_int(f"model.{key}", getattr(self, key), allow_none=True)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}), "
                "or set model.head_dim"
            )


@dataclass
class LoggingConfig:
    """progress: tqdm bar on rank 0.  wandb: also log to Weights & Biases (honours WANDB_MODE).
    peak_flops: FLOP/s per device for MFU (null = detected: GPU table, CPU estimate)."""

    progress: bool = True
    wandb: bool = False
    wandb_project: str = "longtrain"
    wandb_run_name: str | None = None
    peak_flops: float | None = None


@dataclass
class JobConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds train.steps ({self.train.steps}); lower it"
            )
        if self.train.eval_every and self.data.val_fraction == 0:
            raise ConfigError(
                f"train.eval_every={self.train.eval_every} needs a validation split: set data.val_fraction "
                "(e.g. 0.05) or train.eval_every=0"
            )
        if self.model.sliding_window is not None and self.model.sliding_window < self.train.seq_len:
            raise ConfigError(
                f"model.sliding_window={self.model.sliding_window} < train.seq_len={self.train.seq_len}: "
                "sliding-window attention is not supported; set model.sliding_window=null"
            )

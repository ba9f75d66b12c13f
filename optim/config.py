"""Typed config of the optimizer and learning-rate schedule (the ``optim.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """name: adamw | sgd.  lr: peak learning rate.  warmup_steps: linear warm-up from 0.
    schedule: cosine | linear | constant after warm-up, decaying to lr * min_lr_ratio at train.steps.
    grad_clip: max global gradient norm (0 disables clipping).
    """

    name: str = option("adamw", choices=OPTIMIZERS)
    lr: float = option(3e-4, min=0.0)
    weight_decay: float = option(0.1, min=0.0)
    betas: list[float] = option(factory=lambda: [0.9, 0.95], min=0.0, max=1.0, max_open=True)
    eps: float = option(1e-8, min=0.0)
    momentum: float = option(0.9, min=0.0)
    warmup_steps: int = option(10, min=0)
    schedule: str = option("cosine", choices=SCHEDULES)
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0)
    grad_clip: float = option(1.0, min=0.0)

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")

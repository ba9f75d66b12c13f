"""Typed config of the optimizer and learning-rate schedule (the ``optim.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """name: adamw | sgd.  lr: peak learning rate.  warmup_steps: linear warm-up from 0.
    schedule: cosine | linear | constant after warm-up, decaying to lr * min_lr_ratio at train.steps.
    grad_clip: max global gradient norm (0 disables clipping).
    """

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for key in ("lr", "weight_decay", "eps", "grad_clip", "min_lr_ratio", "momentum"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"optim.{key} must be a number >= 0, got {value!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"optim.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if (
            len(self.betas) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in self.betas)
            or not all(0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")

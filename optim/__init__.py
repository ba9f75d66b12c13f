"""Optimizers that run where their state lives (for now: beside the parameters)."""

from .build import build_optimizer, build_scheduler, lr_factor
from .config import OptimConfig

__all__ = ["OptimConfig", "build_optimizer", "build_scheduler", "lr_factor"]

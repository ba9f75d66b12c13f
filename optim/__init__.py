"""Optimizers that run where their state lives: an optimizer container whose sub-groups keep their
AdamW state on the device, in DRAM, in CXL memory or on NVMe (docs/optimizer_offload.md)."""

from . import solver
from .build import build_optimizer, build_scheduler, lr_factor
from .config import OptimConfig
from .container import OptimizerContainer
from .placement import Placement, place_subgroups, split_subgroups

__all__ = [
    "OptimConfig",
    "OptimizerContainer",
    "Placement",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "place_subgroups",
    "solver",
    "split_subgroups",
]

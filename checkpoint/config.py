"""Typed config of checkpointing and resume (the ``checkpoint.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import check_fields, option


@dataclass
class CheckpointConfig:
    """enabled: save checkpoints at all.  every: save every N optimizer steps (and at the end).
    dir: where checkpoints go (default <output_dir>/checkpoints).  keep: newest N kept (0 = all).
    resume: auto (newest complete checkpoint under dir, if any) | never | a checkpoint directory.
    """

    enabled: bool = True
    every: int = option(100, min=1)
    dir: str | None = None
    keep: int = option(2, min=0)
    resume: str = option("auto", nonempty=True)

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")

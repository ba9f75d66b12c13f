"""Typed config of checkpointing and resume (the ``checkpoint.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """enabled: save checkpoints at all.  every: save every N optimizer steps (and at the end).
    dir: where checkpoints go (default <output_dir>/checkpoints).  keep: newest N kept (0 = all).
    resume: auto (newest complete checkpoint under dir, if any) | never | a checkpoint directory.
    """

    enabled: bool = True
    every: int = 100
    dir: str | None = None
    keep: int = 2
    resume: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint.every must be a positive int, got {self.every!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ValueError(f"checkpoint.keep must be an int >= 0 (0 keeps all), got {self.keep!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(
                f"checkpoint.resume must be auto, never or a checkpoint directory, got {self.resume!r}"
            )

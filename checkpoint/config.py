"""Typed config of checkpointing and resume (the ``checkpoint.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

from .parity import ErasureCode


@dataclass
class CheckpointConfig:
    """enabled: save checkpoints at all.  every: save to disk every N optimizer steps (and at the end).
    dir: where checkpoints go (default <output_dir>/checkpoints).  keep: newest N kept (0 = all).
    resume: auto (the newest of: a snapshot in the agents' memory, a complete checkpoint under dir)
    | never | a checkpoint directory.
    snapshot_every: take an in-memory snapshot every N optimizer steps (null = none): a lazy copy of
    the whole training state into this rank's snapshot agent, which outlives a crash of the trainer.
    agents: run snapshot agents (needed by snapshot_every).  ec: erasure code across ranks' snapshots,
    none | xor (one lost rank rebuilt; 1/(N-1) extra memory) | rs:k+m (any m lost ranks; k + m
    must be the number of ranks; m/k extra); a one-rank job codes nothing.
    """

    enabled: bool = True
    every: int = option(100, min=1)
    dir: str | None = None
    keep: int = option(2, min=0)
    resume: str = option("auto", nonempty=True)
    snapshot_every: int | None = option(None, min=0)
    agents: bool = True
    ec: str = "xor"

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        if self.snapshot_every == 0:
            self.snapshot_every = None
        ErasureCode.parse(self.ec, "checkpoint.ec")
        if self.snapshot_every is not None and not self.agents:
            raise ConfigError(
                f"checkpoint.snapshot_every={self.snapshot_every} needs checkpoint.agents=true (the snapshots live "
                "in the agent processes); set checkpoint.snapshot_every=null or checkpoint.agents=true"
            )
        if self.snapshot_every is not None and not self.enabled:
            raise ConfigError(
                f"checkpoint.snapshot_every={self.snapshot_every} with checkpoint.enabled=false; set "
                "checkpoint.snapshot_every=null or checkpoint.enabled=true"
            )

    def check_ranks(self, world_size: int) -> None:
        """The checks that need the number of ranks (the launcher's, before it starts them): an
        rs:k+m code must span the ranks exactly."""
        if self.snapshot_every is not None:
            from .rank_parity import RankParity

            RankParity.build(ErasureCode.parse(self.ec, "checkpoint.ec"), world_size)

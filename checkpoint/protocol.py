"""The ``Checkpointer`` seam: what the training loop may ask of a checkpointer, and the state it
hands over.

The loop calls, in this order every step:

    wait()                       before the optimizer step may change parameters or optimizer state
                                 (before the last backward when the optimizer overlaps it): a save
                                 still copying them finishes first
    ...optimizer step...
    should_save(step, total) -> save(step, state)
                                 save may return before the copy is done (lazy snapshots): the
                                 copy overlaps the next forward/backward, and the next wait() is
                                 where the loop pays for what is left of it

and once before the first step ``load(state)``, once after the last ``close()``; on a
preemption (SIGTERM) ``persist(step, state)`` after the step, before ``close()``. A checkpointer
owns every barrier and collective its saves and loads need: the loop holds no barrier and no
concrete class, so the synchronous disk checkpointer and the snapshot agents plug in alike.

The state is seen only through ``state_dict()``/``load_state_dict()``: the checkpoint package
never reaches into the internals of ``offload/``, ``optim/`` or ``parallel/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


@dataclass
class TrainState:
    """What a checkpoint holds. ``data``: the training loader (its position); the RNG states and
    the step are the checkpointer's to record."""

    model: nn.Module
    optimizer: Stateful
    scheduler: Stateful
    data: Stateful


@dataclass
class Restored:
    """Where a resume came from: the step it restored (training continues at ``step + 1``), the
    data loader's state and the checkpoint it was read from (``source``: "disk" or "agent memory",
    where ``path`` is the snapshot's slot)."""

    step: int
    data_state: dict[str, Any]
    path: Path
    source: str = "disk"


class Checkpointer(Protocol):
    def should_save(self, step: int, total_steps: int) -> bool:
        """Whether ``save`` is due after optimizer step ``step`` of ``total_steps``."""
        ...

    def save(self, step: int, state: TrainState) -> None:
        """Start (or do) saving the state after optimizer step ``step``; every rank calls it."""
        ...

    def wait(self) -> None:
        """Return once no save still reads the parameters or the optimizer state."""
        ...

    def load(self, state: TrainState) -> Restored | None:
        """Restore the newest usable checkpoint into ``state`` (every rank; the data loader's
        position included); None when there is none to resume from (a fresh run)."""
        ...

    def persist(self, step: int, state: TrainState) -> Path | None:
        """Write the state after step ``step`` to disk now and return when it is there (preemption:
        the process is about to end); the checkpoint's directory, or None when checkpoints are off."""
        ...

    def stats(self) -> dict[str, float]:
        """Figures for the metrics line (snapshot and parity bytes; {} when there are none)."""
        ...

    def close(self) -> None:
        """Finish pending saves and release threads, processes and shared memory."""
        ...

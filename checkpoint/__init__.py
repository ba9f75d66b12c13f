"""Checkpoints and resume, behind the ``Checkpointer`` protocol (``protocol.py``): synchronous disk
checkpoints (``sync.py``) and, with ``checkpoint.snapshot_every``, lazy in-memory snapshots in
per-rank agent processes between them (``snapshot.py``, imported from there: importing the package
must not import ``agent``, which runs as ``python -m longtrain.checkpoint.agent``), erasure coded
across ranks (``parity.py`` the codes, ``rank_parity.py`` their layout over the ranks)."""

from .config import CheckpointConfig
from .protocol import Checkpointer, Restored, TrainState
from .sync import (
    CheckpointError,
    SyncCheckpointer,
    find_checkpoint,
    is_complete,
    list_complete,
    list_steps,
    load_weights,
    newest_verified,
    verify,
)

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "CheckpointError",
    "Restored",
    "SyncCheckpointer",
    "TrainState",
    "find_checkpoint",
    "is_complete",
    "list_complete",
    "list_steps",
    "load_weights",
    "newest_verified",
    "verify",
]

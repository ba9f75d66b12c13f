"""Checkpoints and resume, behind the ``Checkpointer`` protocol (``protocol.py``). For now a simple
synchronous save/resume (``sync.py``); the lazy asynchronous in-memory snapshots with erasure
coding replace its save path later."""

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

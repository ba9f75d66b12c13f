"""Checkpoints and resume. For now a simple synchronous save/resume (``sync.py``); the lazy
asynchronous in-memory snapshots with erasure coding replace its save path later."""

from .config import CheckpointConfig
from .sync import (
    CheckpointError,
    Restored,
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
    "CheckpointError",
    "Restored",
    "SyncCheckpointer",
    "find_checkpoint",
    "is_complete",
    "list_complete",
    "list_steps",
    "load_weights",
    "newest_verified",
    "verify",
]

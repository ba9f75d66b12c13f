"""Parallel layout: the mesh, gradient sync (plain data parallelism for now).

Hybrid data/context parallelism with ring attention plugs in here as attention cores that
satisfy the adapter's interface, injected by the trainer.
"""

from .config import ParallelConfig
from .mesh import Mesh, all_reduce_sum, broadcast_object, init_mesh, shutdown, sync_gradients

__all__ = [
    "Mesh",
    "ParallelConfig",
    "all_reduce_sum",
    "broadcast_object",
    "init_mesh",
    "shutdown",
    "sync_gradients",
]

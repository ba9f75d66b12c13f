"""Parallel layout: the mesh (a named ("dp", "cp") DeviceMesh), how model states are held over the
data-parallel ranks (``apply_sharding``: replicated, FSDP2 in fsdp.py,
or a DeepSpeed ZeRO-3 engine in zero3.py), gradient sync.

Hybrid data/context parallelism with ring attention plugs in here as attention cores that
satisfy the adapter's interface, injected by the trainer.
"""

from .config import ParallelConfig
from .mesh import Mesh, all_reduce_sum, all_reduce_sums, broadcast_object, init_mesh, shutdown, sync_gradients
from .sharding import GradientSync, Sharding, apply_sharding
from .zero3 import EngineCheckpointer, EngineOptimizer, Zero3Spec

__all__ = [
    "EngineCheckpointer",
    "EngineOptimizer",
    "GradientSync",
    "Mesh",
    "ParallelConfig",
    "Sharding",
    "all_reduce_sum",
    "all_reduce_sums",
    "apply_sharding",
    "broadcast_object",
    "init_mesh",
    "shutdown",
    "sync_gradients",
    "Zero3Spec",
]

"""Typed config of the parallel layout (the ``parallel.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """data_parallel: number of data-parallel ranks (-1 = the whole world size).
    context_parallel: ranks that share one long document (ring attention); 1 until the parallel
        package lands.
    backend: torch.distributed backend; auto = nccl on CUDA, gloo on CPU.
    """

    data_parallel: int = -1
    context_parallel: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        if (
            isinstance(self.data_parallel, bool)
            or not isinstance(self.data_parallel, int)
            or (self.data_parallel != -1 and self.data_parallel < 1)
        ):
            raise ValueError(
                f"parallel.data_parallel must be -1 (world size) or a positive int, got {self.data_parallel!r}"
            )
        if self.context_parallel != 1:
            raise ValueError(
                f"parallel.context_parallel={self.context_parallel} is not available yet (hybrid data/context "
                "parallelism is a later release); set parallel.context_parallel=1"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def resolve_data_parallel(self, world_size: int) -> int:
        dp = world_size if self.data_parallel == -1 else self.data_parallel
        if dp * self.context_parallel != world_size:
            raise ValueError(
                f"parallel.data_parallel={dp} x parallel.context_parallel={self.context_parallel} does not match "
                f"the world size {world_size}; set parallel.data_parallel=-1 or launch {dp * self.context_parallel} processes"
            )
        return dp

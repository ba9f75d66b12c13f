"""Typed config of the parallel layout (the ``parallel.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

BACKENDS = ("auto", "gloo", "nccl")
SHARDING = ("none", "fsdp", "deepspeed")


@dataclass
class ParallelConfig:
    """data_parallel: number of data-parallel ranks (-1 = the whole world size).
    context_parallel: ranks that share one long document (ring attention); 1 until the parallel
        package lands.
    backend: torch.distributed backend; auto = nccl on CUDA, gloo on CPU.
    shard: how model states are held over the data-parallel ranks: none (replicated; gradients
        all-reduced) | fsdp (FSDP2: parameters, gradients and optimizer state sharded, ZeRO-3;
        parallel/fsdp.py) | deepspeed (a DeepSpeed ZeRO-3 engine built from longtrain's config, optimizer
        state offloaded by DeepSpeed per optim.offload none / dram / nvme; parallel/zero3.py).
    """

    data_parallel: int = -1
    context_parallel: int = option(1, min=1)
    backend: str = option("auto", choices=BACKENDS)
    shard: str = option("none", choices=SHARDING)

    def __post_init__(self) -> None:
        check_fields(self, "parallel")
        if self.data_parallel != -1 and self.data_parallel < 1:
            raise ConfigError(
                f"parallel.data_parallel must be -1 (world size) or a positive int, got {self.data_parallel}"
            )
        if self.context_parallel != 1:
            raise ConfigError(
                f"parallel.context_parallel={self.context_parallel} is not available yet (hybrid data/context "
                "parallelism is a later release); set parallel.context_parallel=1"
            )

    def resolve_data_parallel(self, world_size: int) -> int:
        dp = world_size if self.data_parallel == -1 else self.data_parallel
        if dp * self.context_parallel != world_size:
            raise ConfigError(
                f"parallel.data_parallel={dp} x parallel.context_parallel={self.context_parallel} does not match "
                f"the world size {world_size}; set parallel.data_parallel=-1 or launch {dp * self.context_parallel} processes"
            )
        return dp

"""Typed config of the parallel layout (the ``parallel.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

BACKENDS = ("auto", "gloo", "nccl")
SHARDING = ("none", "fsdp", "deepspeed")
MODES = ("dp", "cp", "hdp")
CP_IMPLS = ("ring", "ulysses")
HDP_COSTS = ("profile", "default")


@dataclass
class ParallelConfig:
    """mode: dp (every rank trains on its own packed rows) | cp (a static dp x cp mesh: the documents
        of a micro-batch are split over the ``context_parallel`` ranks of a cp group) | hdp (hybrid
        data/context parallelism: each step the global batch is planned over all ranks, long
        documents on rings of ranks, short ones packed; docs/parallel.md).
    data_parallel: number of data-parallel ranks (-1 = the world size / context_parallel).
    context_parallel: ranks of a cp group (mode cp only).
    cp_impl: how a cp group computes attention (mode cp): ring (zigzag ring attention, any size) |
        ulysses (all-to-all heads <-> sequence; the group size must divide the kv heads).
    token_capacity: tokens per rank and micro-batch in mode hdp (null = train.seq_len x
        data.micro_batch_size): documents longer than it run on rings, shorter ones are packed.
    hdp_balance: mode hdp: plan each step with the balance scheduler (true: rings sized and placed,
        short documents filling the waits, for an even per-rank busy time) or naive HDP (false:
        best-fit packs and minimal rings in data order, ranks round robin; for comparisons).
    hdp_cost: mode hdp: the cost model the scheduler balances with: profile (fitted at start-up from
        timed forward + backward passes of this model on five synthetic packs up to the token
        capacity, and a timed ring hop between ranks, averaged over the ranks; kept in output_dir/hdp_cost.json and read back by a
        re-run of the same job, so a resume plans as the first run did) | default (ByteScale's
        published ratios for a 7B model on GPUs; for simulations and comparisons).
    backend: torch.distributed backend; auto = nccl on CUDA, gloo on CPU.
    shard: how model states are held over the data-parallel ranks: none (replicated; gradients
        all-reduced) | fsdp (FSDP2: parameters, gradients and optimizer state sharded, ZeRO-3, over
        the dp ranks, in mode cp over dp x cp, in mode hdp over all ranks, the step's jobs then run
        in lock-step rounds with padding, parallel/hdp_rounds.py; parallel/fsdp.py) | deepspeed (a
        DeepSpeed ZeRO-3 engine built from longtrain's config, optimizer state offloaded by DeepSpeed
        per optim.offload none / dram / nvme; parallel/zero3.py).
    """

    data_parallel: int = -1
    mode: str = option("dp", choices=MODES)
    context_parallel: int = option(1, min=1)
    cp_impl: str = option("ring", choices=CP_IMPLS)
    token_capacity: int | None = option(None, min=1)
    hdp_balance: bool = True
    hdp_cost: str = option("profile", choices=HDP_COSTS)
    backend: str = option("auto", choices=BACKENDS)
    shard: str = option("none", choices=SHARDING)

    def __post_init__(self) -> None:
        check_fields(self, "parallel")
        if self.data_parallel != -1 and self.data_parallel < 1:
            raise ConfigError(
                f"parallel.data_parallel must be -1 (world size) or a positive int, got {self.data_parallel}"
            )
        if self.context_parallel != 1 and self.mode != "cp":
            raise ConfigError(
                f"parallel.context_parallel={self.context_parallel} needs parallel.mode=cp (mode {self.mode} "
                "has no static cp groups); set parallel.mode=cp or parallel.context_parallel=1"
            )
        if self.token_capacity is not None and self.mode != "hdp":
            raise ConfigError(
                f"parallel.token_capacity={self.token_capacity} applies to parallel.mode=hdp only; set "
                "parallel.mode=hdp or parallel.token_capacity=null"
            )
        if not self.hdp_balance and self.mode != "hdp":
            raise ConfigError(
                "parallel.hdp_balance=false applies to parallel.mode=hdp only; set parallel.mode=hdp or "
                "parallel.hdp_balance=true"
            )
        if self.hdp_cost != "profile" and self.mode != "hdp":
            raise ConfigError(
                f"parallel.hdp_cost={self.hdp_cost} applies to parallel.mode=hdp only; set parallel.mode=hdp or "
                "parallel.hdp_cost=profile"
            )
        if self.mode != "dp" and self.shard == "deepspeed":
            raise ConfigError(
                f"parallel.shard=deepspeed with parallel.mode={self.mode} is not supported: the engine's "
                "partitioning has not been combined with context parallelism yet; use parallel.shard=fsdp "
                "(mode cp) or none"
            )

    def resolve_data_parallel(self, world_size: int) -> int:
        if self.mode == "hdp" and self.data_parallel not in (-1, world_size):
            raise ConfigError(
                f"parallel.data_parallel={self.data_parallel} does not match the world size {world_size} "
                "(parallel.mode=hdp plans over all ranks); set parallel.data_parallel=-1"
            )
        dp = world_size // self.context_parallel if self.data_parallel == -1 else self.data_parallel
        if dp * self.context_parallel != world_size:
            raise ConfigError(
                f"parallel.data_parallel={dp} x parallel.context_parallel={self.context_parallel} does not match "
                f"the world size {world_size}; set parallel.data_parallel=-1 or launch {dp * self.context_parallel} processes"
            )
        return dp

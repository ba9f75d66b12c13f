"""Typed config of the optimizer and learning-rate schedule (the ``optim.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
OFFLOADS = ("none", "dram", "cxl", "nvme", "auto")
CPU_IMPLS = ("auto", "torch", "deepspeed")


@dataclass
class OptimConfig:
    """name: adamw | sgd.  lr: peak learning rate.  warmup_steps: linear warm-up from 0.
    schedule: cosine | linear | constant after warm-up, decaying to lr * min_lr_ratio at train.steps.
    grad_clip: max global gradient norm (0 disables clipping); the container clips inside its step.

    Where the AdamW state (m, v) of each sub-group of ~``subgroup_params`` parameters (whole tensors,
    model order) lives (docs/optimizer_offload.md):
    offload: none (beside the parameters) | dram (host memory, pinned on CUDA) | cxl (a CPU-less NUMA
      node, else DRAM emulated with ``cxl_bandwidth_gbps`` / ``cxl_latency_us`` per transfer) | nvme
      (files under ``nvme_dir``, O_DIRECT) | auto (dram when the whole state fits
      ``dram_budget_bytes``; else the sub-groups whose gradients arrive last in backward, the first
      layers, stay in dram while they fit beside the staging buffers, and the rest go to nvme).
    dram_budget_bytes: host bytes the store may hold (state + staging buffers); null = no limit, and
      for auto half of the memory available at start-up.
    cxl_node: NUMA node of the CXL tier (null = the first CPU-less node, else emulated).
    cpu_impl: the CPU AdamW of the host tiers: torch (fused) | deepspeed (DeepSpeedCPUAdam, float32;
      builds its op on first use, about a minute) | auto (torch, unless DeepSpeed's op is already
      built and is measured faster on a small buffer at start-up; auto never builds it).
    overlap: start a sub-group's update while backward still runs, once its gradients are complete
      (single data-parallel rank; see OptimizerContainer).
    """

    name: str = option("adamw", choices=OPTIMIZERS)
    lr: float = option(3e-4, min=0.0)
    weight_decay: float = option(0.1, min=0.0)
    betas: list[float] = option(factory=lambda: [0.9, 0.95], min=0.0, max=1.0, max_open=True)
    eps: float = option(1e-8, min=0.0)
    momentum: float = option(0.9, min=0.0)
    warmup_steps: int = option(10, min=0)
    schedule: str = option("cosine", choices=SCHEDULES)
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0)
    grad_clip: float = option(1.0, min=0.0)
    offload: str = option("none", choices=OFFLOADS)
    subgroup_params: int = option(10_000_000, min=1)
    nvme_dir: str | None = option(None, nonempty=True)
    dram_budget_bytes: int | None = option(None, min=1)
    cxl_node: int | None = option(None, min=0)
    # Emulation when the host has no CXL memory: an assumed x8 CXL add-in card (PCIe 5.0 x8 is
    # ~32 GB/s raw) and ~2-5x local DRAM latency (reference/offload.md section 2).
    cxl_bandwidth_gbps: float = option(20.0, min=0.0, min_open=True)
    cxl_latency_us: float = option(0.4, min=0.0)
    cpu_impl: str = option("auto", choices=CPU_IMPLS)
    overlap: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if self.offload != "none" and self.name != "adamw":
            raise ConfigError(
                f"optim.offload={self.offload} needs optim.name=adamw (the tiers hold AdamW state); "
                "set optim.offload=none"
            )
        if self.offload == "nvme" and self.nvme_dir is None:
            raise ConfigError("optim.offload=nvme needs optim.nvme_dir (a directory on a local NVMe disk)")

"""The CPU AdamW that updates host-tier sub-groups: torch's fused AdamW or DeepSpeedCPUAdam.

Both are library optimizers driven through their ``step()``; the container points their state
(``exp_avg``, ``exp_avg_sq``) at tier memory before each step. Measured on machines like ours
(reference/offload.md section 4) both sit on the memory-bandwidth floor (28 bytes per parameter),
torch's fused AdamW needs no build, and DeepSpeed's op is a JIT C++ build of about a minute on
2 cores. So ``auto`` never builds it: it takes torch unless DeepSpeed's op is already built
(installed prebuilt or in torch's extension cache) and measures faster here on a small buffer.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.cpp_extension import get_default_build_root

from longtrain.config_checks import ConfigError

ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def _deepspeed_op_built() -> bool:
    """DeepSpeed's cpu_adam op loads without a build: installed prebuilt, or in torch's extension
    cache (checked without importing deepspeed, whose import is slow and probes accelerators, and
    without creating the cache directory as torch's own lookup does)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return False
    if any((Path(spec.origin).parent / "ops" / "adam").glob("cpu_adam_op*.so")):
        return True
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    cuda = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return (Path(root) / f"{python}_{cuda}" / "cpu_adam" / "cpu_adam.so").is_file()


def load_deepspeed_cpu_adam(
    setting: str = "optim.cpu_impl=deepspeed", remedy: str = "set optim.cpu_impl=torch or auto"
) -> Any:
    """DeepSpeedCPUAdam with its op loaded (built on first use), else a ConfigError naming the
    ``setting`` that asked for it and the ``remedy``."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as e:  # an ImportError, a compiler error, a missing header...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{setting}: DeepSpeed cannot build its CPU Adam op ({reason}); {remedy}") from None
    return DeepSpeedCPUAdam  # a torch.optim.Optimizer whose __init__ takes adamw_mode


def make_cpu_adam(impl: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A CPU AdamW over ``groups`` (``params`` plus the keys of ADAM_KEYS)."""
    if impl == "deepspeed":
        cls = load_deepspeed_cpu_adam()
        return cls(groups, adamw_mode=True)
    return torch.optim.AdamW(groups, fused=True)


def _seconds_per_step(impl: str, numel: int) -> float:
    p = torch.zeros(numel)
    p.grad = torch.full((numel,), 1e-3)
    opt = make_cpu_adam(
        impl, [{"params": [p], "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}]
    )
    for _ in range(2):
        opt.step()
    start = time.perf_counter()
    for _ in range(3):
        opt.step()
    return (time.perf_counter() - start) / 3


def resolve_cpu_impl(choice: str, dtype: torch.dtype, probe_numel: int = 2**20) -> str:
    """torch | deepspeed for ``optim.cpu_impl=choice`` with master weights of ``dtype``."""
    if choice == "torch":
        return "torch"
    if choice == "deepspeed":
        if dtype != torch.float32:
            raise ConfigError(
                f"optim.cpu_impl=deepspeed needs float32 parameters, these are {dtype}; set optim.cpu_impl=torch"
            )
        load_deepspeed_cpu_adam()
        return "deepspeed"
    if dtype != torch.float32 or not _deepspeed_op_built():
        return "torch"
    faster = min(("torch", "deepspeed"), key=lambda impl: _seconds_per_step(impl, probe_numel))
    return faster

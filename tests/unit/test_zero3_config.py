"""``parallel.shard=deepspeed``: the DeepSpeed config derived from longtrain's keys, and the one-line
errors for what the engine cannot do (before the first step)."""

from __future__ import annotations

import pytest

from longtrain.optim.config import OptimConfig
from longtrain.parallel.zero3 import Zero3Spec, _cpu_adam, deepspeed_config
from longtrain.trainer.compose import compose
from longtrain.trainer.config import ConfigError, JobConfig


def job(*overrides: str) -> JobConfig:
    return compose("tiny_cpu", ["parallel.shard=deepspeed", "checkpoint.enabled=false", *overrides])


def test_config_maps_offload_clipping_accumulation_and_dtype():
    spec = Zero3Spec(
        OptimConfig(offload="nvme", nvme_dir="/mnt/nvme", grad_clip=0.5, subgroup_params=1000),
        grad_accum=3,
        micro_batch_size=2,
        dtype="bfloat16",
    )
    cfg = deepspeed_config(spec, dp_size=4)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/mnt/nvme"}
    assert zero["sub_group_size"] == 1000
    assert zero["stage3_param_persistence_threshold"] == 0  # every parameter partitioned, as FSDP
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 3 * 4
    assert cfg["bf16"] == {"enabled": True}
    dram = deepspeed_config(Zero3Spec(OptimConfig(offload="dram"), 1, 1, "float32"), dp_size=2)
    assert dram["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert dram["bf16"] == {"enabled": False}
    none = deepspeed_config(Zero3Spec(OptimConfig(), 1, 1, "float32"), dp_size=2)
    assert none["zero_optimization"]["offload_optimizer"] == {"device": "none"}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.offload=cxl"], "optim.offload=cxl"),
        (["optim.offload=auto"], "optim.offload=auto"),
        (["optim.name=sgd"], "optim.name=sgd"),
        (["train.dtype=float64"], "train.dtype=float64"),
        (["optim.offload=nvme"], "optim.nvme_dir"),
        (["checkpoint.enabled=true", "checkpoint.snapshot_every=1"], "checkpoint.snapshot_every=null"),
    ],
)
def test_what_the_engine_cannot_do_fails_with_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        job(*overrides)
    message = str(info.value)
    assert key in message and "\n" not in message, message


def test_deepspeed_cpu_adam_that_cannot_build_names_the_key(monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def fail(self, *args, **kwargs):
        raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(CPUAdamBuilder, "load", fail)
    with pytest.raises(ConfigError) as info:
        _cpu_adam([], OptimConfig())
    message = str(info.value)
    assert "parallel.shard=deepspeed" in message and "\n" not in message, message
    assert "subcommand failed" in message

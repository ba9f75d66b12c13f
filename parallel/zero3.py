"""A DeepSpeed ZeRO-3 engine built from longtrain's config (``parallel.shard=deepspeed``), for users
already on DeepSpeed: parameters, gradients and optimizer state partitioned over the data-parallel
ranks by DeepSpeed, the optimizer state offloaded by DeepSpeed (``optim.offload`` none / dram /
nvme -> ``offload_optimizer.device`` none / cpu / nvme), longtrain's activation memory unchanged.

    sharding = apply_zero3(model, spec, mesh)   # after the activation executor is set
    per micro-batch: grad_sync.before_backward(last); engine forward; grad_sync.backward(loss)
    per step:        optimizer.clip_and_step()  # engine.step(): clip, CPU Adam, repartition

The seam. ZeRO-3 gathers a module's parameters in forward pre-hooks and frees them in forward
post-hooks, on every submodule by default; its backward hooks (on the module's outputs and inputs)
gather them again before the module's backward and free them after. longtrain's executors never
call a decoder layer's ``forward``: they run one layer's forward as ``parts.call(fn, x_th)``
(trainer/model/adapter.py), and the token-wise executor rebuilds rows inside the layer's backward.
So each decoder layer is made a ZeRO-3 *leaf* (``set_z3_leaf_module``: its hooks gather all its
parameters, its children get none) and its ``LAYER_METHOD`` runs ``fn`` as the layer module's
forward for that call, through ``nn.Module.__call__``: the layer's hooks fire around every forward
any executor runs, the whole layer stays gathered for the call (the token-wise executor sees one
set of parameter storages, never a half-gathered layer), and its backward, where recompute and
token-wise rebuilds run, is bracketed by the gather / release hooks on its output and input.

The engine wraps ``EngineRoot``, not the model: ZeRO-3's backward hooks and the engine's
backward prologue find the tensors of a module's output only in tensors, tuples, lists and dicts,
so the root returns the model's output fields as a dict (``EngineForward`` turns it back into a
``CausalLMOutput`` for the loop). The LM head's weight is read by the chunked loss, not by calling
``lm_head``: it is registered as an external parameter of that root, gathered for the forward and
again when backward reaches the loss.

Token-weighted loss: each rank's loss is its token-loss sum over the *global* token count, so the
gradients must be summed over ranks. ZeRO-3 averages them (its reduce-scatter divides by the
data-parallel size, and ``gradient_predivide_factor`` must be 1 with reduce-scatter), so the loss
handed to ``engine.backward`` is multiplied by that size (exact for a power of two), with
``scale_wrt_gas=False``: longtrain's loss is already over the whole step's tokens. Gradient
accumulation: ``set_gradient_accumulation_boundary`` marks the step's last micro-batch and the
loop calls ``engine.step()`` once per step.

Every parameter is partitioned (``stage3_param_persistence_threshold`` 0), as FSDP does, so the
state bytes compare with ``parallel.shard=fsdp``.
"""

from __future__ import annotations

import json
import shutil
import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from longtrain.config_checks import ConfigError
from longtrain.trainer.model.adapter import LAYER_METHOD, CausalLM, CausalLMOutput

from .mesh import Mesh

if TYPE_CHECKING:
    from longtrain.optim.config import OptimConfig

__all__ = [
    "EngineForward",
    "EngineGradientSync",
    "EngineOptimizer",
    "EngineRoot",
    "Zero3Spec",
    "apply_zero3",
    "deepspeed_config",
]

OFFLOAD_DEVICE = {"none": "none", "dram": "cpu", "nvme": "nvme"}  # optim.offload -> offload_optimizer.device


@dataclass
class Zero3Spec:
    """What the engine's config is derived from (the keys of other packages it reads)."""

    optim: OptimConfig
    grad_accum: int  # train.grad_accum
    micro_batch_size: int  # data.micro_batch_size (DeepSpeed's sample bookkeeping only)
    dtype: str  # train.dtype


def check_spec(spec: Zero3Spec) -> None:
    """One line naming the key for what the DeepSpeed engine cannot do."""
    if spec.optim.offload not in OFFLOAD_DEVICE:
        raise ConfigError(
            f"optim.offload={spec.optim.offload} is not available with parallel.shard=deepspeed "
            "(DeepSpeed offloads the optimizer state to cpu or nvme); use none, dram or nvme"
        )
    if spec.optim.name != "adamw":
        raise ConfigError(
            f"parallel.shard=deepspeed needs optim.name=adamw, got optim.name={spec.optim.name}"
        )
    if spec.dtype == "float64":
        raise ConfigError(
            "train.dtype=float64 is not available with parallel.shard=deepspeed (ZeRO-3 reduces "
            "float32 or 16-bit gradients); use float32 or bfloat16"
        )
    if spec.optim.offload == "nvme" and spec.optim.nvme_dir is None:
        raise ConfigError("optim.offload=nvme needs optim.nvme_dir (a directory on a local NVMe disk)")


def deepspeed_config(spec: Zero3Spec, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of ``spec`` on ``dp_size`` data-parallel ranks."""
    offload: dict[str, Any] = {"device": OFFLOAD_DEVICE[spec.optim.offload]}
    if spec.optim.offload == "nvme":
        offload["nvme_path"] = spec.optim.nvme_dir
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * dp_size,
        "gradient_clipping": spec.optim.grad_clip,
        "bf16": {"enabled": spec.dtype == "bfloat16"},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": offload,
            "sub_group_size": spec.optim.subgroup_params,
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _layer_call_zero3(module: nn.Module, fn: Callable[..., Any], x_th: Tensor, *args: Any) -> Any:
    """``LAYER_METHOD`` of a decoder layer under ZeRO-3: ``fn(x_th, *args)`` as the module's forward
    for this one call, so that ``__call__`` runs ZeRO-3's hooks around it (see the module docstring)."""
    module.forward = fn  # an instance attribute shadows the class's forward
    try:
        return module(x_th, *args)
    finally:
        del module.forward


def _cpu_adam(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam (AdamW) over ``groups``, built on first use, else one line naming the key."""
    from longtrain.optim.cpu_adam import load_deepspeed_cpu_adam

    cls = load_deepspeed_cpu_adam("parallel.shard=deepspeed", "set parallel.shard=fsdp or none")
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adamw_mode=True)


class EngineRoot(nn.Module):
    """The module the engine wraps: ``model``, its output as a dict (see the module docstring)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> dict[str, Any]:
        out = self.model(**batch)
        return {f.name: getattr(out, f.name) for f in fields(out)}


class EngineForward:
    """What the loop calls for a forward: the engine, its output back as a ``CausalLMOutput``."""

    def __init__(self, engine: Any):
        self.engine = engine

    def __call__(self, **batch: Any) -> CausalLMOutput:
        return CausalLMOutput(**self.engine(**batch))


def apply_zero3(
    model: CausalLM, spec: Zero3Spec, mesh: Mesh
) -> tuple[EngineForward, EngineGradientSync, EngineOptimizer]:
    """Partition ``model`` with a DeepSpeed ZeRO-3 engine; returns what the loop calls instead of
    the model for a forward, the gradient sync (backward through the engine) and the optimizer."""
    check_spec(spec)
    import deepspeed
    from deepspeed.utils import set_z3_leaf_module

    from longtrain.optim.build import param_groups

    params = [p for p in model.parameters() if p.requires_grad]
    client = _cpu_adam(param_groups(params, spec.optim.weight_decay), spec.optim)
    for parts in model.layer_parts:
        set_z3_leaf_module(parts.module, True)
        setattr(parts.module, LAYER_METHOD, types.MethodType(_layer_call_zero3, parts.module))
    root = EngineRoot(model)
    engine, _, _, _ = deepspeed.initialize(
        model=root,
        optimizer=client,
        config=deepspeed_config(spec, mesh.dp_size),
        dist_init_required=False,
    )
    # read by the chunked loss without calling lm_head: gathered with the root module
    deepspeed.zero.register_external_parameter(root, model.lm_head.weight)
    return (
        EngineForward(engine),
        EngineGradientSync(engine, mesh.dp_size),
        EngineOptimizer(engine, client, spec),
    )


class EngineGradientSync:
    """Micro-batch bookkeeping and backward through the engine (gradients summed over ranks)."""

    def __init__(self, engine: Any, dp_size: int):
        self.engine, self.dp_size = engine, dp_size

    def before_backward(self, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: Tensor) -> None:
        # ZeRO-3 averages over the ranks; the loss is over the global token count: undo the mean
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)

    def after_backward(self) -> None:
        """Nothing: ZeRO-3 reduce-scattered during backward."""


class EngineOptimizer(torch.optim.Optimizer):
    """What the loop and the scheduler see of the engine's optimizer: its param groups (the CPU
    Adam's own dicts, so the scheduler's learning rate is the one it uses) and ``clip_and_step``."""

    def __init__(self, engine: Any, client: torch.optim.Optimizer, spec: Zero3Spec):
        self.engine, self.client = engine, client
        self.offload = spec.optim.offload
        # this rank's partition of every parameter: DeepSpeed keeps an fp32 copy, m and v of it
        self._numel = sum(p.partition_numel() for p in engine.module.parameters())
        super().__init__(client.param_groups, {})  # the same dicts, not copies

    def before_last_backward(self) -> None:
        """Nothing: the engine starts no update before ``step``."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.engine.step()

    def clip_and_step(self) -> float:
        """Clip to optim.grad_clip, update and drop the gradients; returns the global norm."""
        self.step()  # (the scheduler wraps ``step`` to check it ran)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the engine drops the gradients in its step."""

    def stats(self) -> dict[str, float | str | None]:
        """This rank's AdamW state bytes (m, v of its partitions) on the tier DeepSpeed keeps them."""
        state = 2 * self._numel * 4
        tier = {"none": "device", "dram": "dram", "nvme": "nvme"}[self.offload]
        return {f"optim_{t}_bytes": state if t == tier else 0 for t in ("device", "dram", "cxl", "nvme")}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the engine's optimizer state lives in DeepSpeed's partitions: EngineCheckpointer saves it with "
            "engine.save_checkpoint"
        )

    def close(self) -> None:
        """Nothing to release (DeepSpeed's swap files stay under optim.nvme_dir)."""


ENGINE_DIR = "deepspeed"  # the engine's own files inside a checkpoint directory


class EngineCheckpointer:
    """Disk checkpoints of a ZeRO-3 engine (``parallel.shard=deepspeed``), a ``Checkpointer``.

    A ``step-N`` directory holds what longtrain's disk checkpoints hold, in the same format:
    ``model.safetensors`` (every parameter gathered from its partitions, HF names: ``longtrain
    export`` and ``model.path``-style reuse read it on any world size), ``trainer_state.json``
    (step, data position, RNG, architecture), ``optimizer.pt`` (the LR scheduler), and the
    manifest with every file's size and checksum, written last before an atomic rename. The
    optimizer state stays in DeepSpeed's own partitioned files under ``deepspeed/``
    (``engine.save_checkpoint``; read back by ``engine.load_checkpoint``, which unpickles them:
    only files whose checksums the manifest vouches for are read). Those partitions resume on the
    number of ranks that wrote them only; another world size is refused naming both."""

    def __init__(self, disk: Any, engine: Any, mesh: Mesh):
        """``disk``: the run's ``SyncCheckpointer`` (its config, directory, manifest rules)."""
        self.disk, self.engine, self.mesh = disk, engine, mesh
        self.saved_step: int | None = None

    def should_save(self, step: int, total_steps: int) -> bool:
        return bool(self.disk.should_save(step, total_steps))

    def save(self, step: int, state: Any) -> None:
        import deepspeed
        from safetensors.torch import save_file

        from longtrain.checkpoint.sync import _step_dir, _unshared

        final = _step_dir(self.disk.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.mesh.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        torch.distributed.barrier()
        full: dict[str, Tensor] = {}
        for name, p in state.model.named_parameters():  # one parameter gathered at a time
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.mesh.is_main:
                    full[name] = p.detach().cpu().clone()
        self.engine.save_checkpoint(str(tmp), tag=ENGINE_DIR, client_state={}, save_latest=False)
        torch.distributed.barrier()  # every rank's partition files are written
        if self.mesh.is_main:
            save_file(_unshared(full), str(tmp / "model.safetensors"))
            torch.save({"scheduler": state.scheduler.state_dict()}, tmp / "optimizer.pt")
            trainer_state = {
                "step": step,
                "data": state.data.state_dict(),
                "rng_cpu": torch.get_rng_state().tolist(),
                "model_config": self.disk.model_config,
                "deepspeed_world_size": self.mesh.world_size,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            self.disk.seal(tmp, final, step)
        torch.distributed.barrier()
        self.saved_step = step

    def persist(self, step: int, state: Any) -> Any:
        """Write step ``step`` now (preemption), unless it was just saved; its directory, or None
        when checkpoints are off."""
        from longtrain.checkpoint.sync import _step_dir

        if not self.disk.cfg.enabled:
            return None
        if self.saved_step != step:
            self.save(step, state)
        return _step_dir(self.disk.root, step)

    def stats(self) -> dict[str, float]:
        return {}

    def wait(self) -> None:
        """Nothing to wait for: ``save`` returns after the files are written."""

    def load(self, state: Any) -> Any:
        from longtrain.checkpoint.protocol import Restored
        from longtrain.checkpoint.sync import CheckpointError

        path = self.disk.agreed_resume()
        if path is None:
            return None
        saved = json.loads((path / "trainer_state.json").read_text())
        if saved.get("model_config") != self.disk.model_config:
            changed = sorted(
                k
                for k in set(saved.get("model_config", {})) | set(self.disk.model_config)
                if saved.get("model_config", {}).get(k) != self.disk.model_config.get(k)
            )
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for a different model (model.{', model.'.join(changed)} "
                "differ); use a new output_dir or checkpoint.resume=never"
            )
        world = saved.get("deepspeed_world_size")
        if world is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was not written by parallel.shard=deepspeed (it has no DeepSpeed "
                "optimizer partitions); resume it with the parallel.shard it was written with, or use a new "
                "output_dir or checkpoint.resume=never"
            )
        if world != self.mesh.world_size:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds DeepSpeed optimizer partitions of {world} ranks and this run has "
                f"{self.mesh.world_size}: resume it with --nproc {world} (its model.safetensors holds the full "
                "weights for `longtrain export` on any world size)"
            )
        self.engine.load_checkpoint(
            str(path), tag=ENGINE_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state.scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(torch.tensor(saved["rng_cpu"], dtype=torch.uint8))
        state.data.load_state_dict(saved["data"])
        return Restored(step=saved["step"], data_state=saved["data"], path=path)

    def close(self) -> None:
        """Nothing to release: no threads, no processes."""

"""The optimizer container: clip, step and zero_grad over sub-groups whose state lives on tiers.

    optimizer = build_optimizer(model, cfg.optim)          # optim/build.py
    scheduler = build_scheduler(optimizer, cfg.optim, steps)  # LambdaLR over optimizer.param_groups
    for each step:
        for each micro-batch: forward; [optimizer.before_last_backward() before the last]; backward
        grad_norm = optimizer.clip_and_step()              # clip, update every sub-group, zero grads
        scheduler.step()

It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the model's decay / no-decay groups
(what the scheduler sets ``lr`` on). Underneath, the parameters are split into sub-groups (whole
tensors, model order; ``placement.py``), each updated by its own library optimizer on the tier
where its AdamW state (m, v) lives:

- device: ``torch.optim.AdamW`` (or SGD) over the parameters, state beside them;
- dram: a CPU AdamW (``cpu_adam.py``: torch fused or DeepSpeedCPUAdam) with m, v in registered
  host memory (pinned on CUDA), updated in place;
- cxl, nvme: the same CPU AdamW on m, v loaded into a DRAM staging slot before the update and
  stored back after (``staging.py``, ``tiers.py``).
On a CPU device the CPU AdamW updates the parameters and reads ``p.grad`` in place. On CUDA it
works on a pinned host buffer allocated once: the sub-group's parameters and gradients are copied
to it, updated, and the parameters copied back (parameters are float32 or float64 here, so they
are their own master weights and no separate master copy is kept). ``subgroup.py`` builds a
sub-group and binds its state.

Clipping (``optim.grad_clip``): the global norm is the norm of the per-tensor gradient norms, as
``torch.nn.utils.clip_grad_norm_`` computes it. Each sub-group's norms are computed as soon as its
gradients are complete; no update starts before the global norm is known (it needs every
gradient), and the update multiplies the gradients it reads by
``min(1, grad_clip / (norm + 1e-6))``: ``p.grad`` in place on a CPU device and on the device tier,
as ``clip_grad_norm_`` does; on CUDA, the host copy of the host tiers (``p.grad`` stays unscaled
there, and ``clip_and_step`` drops it). The result equals ``clip_grad_norm_`` then AdamW.

Overlap with backward (``optim.overlap``, one data-parallel rank): the loop calls
``before_last_backward()`` before the backward of a step's last micro-batch. Gradients are final
only after it (with accumulation, earlier backwards add to them), so only then do the hooks
(``register_post_accumulate_grad_hook``) count accumulations; a sub-group is complete when its
tensors have received as many as in the previous step's last backward (``readiness.py``: the first
step, and any change of the counts, leave the work to ``step()``; more accumulations than counted
after a sub-group started raise). A complete sub-group's norms start on the update thread, and
without clipping its update too. Updates run in arrival order (last sub-group first), the order in
which the staged tiers are prefetched, which starts at ``before_last_backward()``. Under
data parallelism the gradients are final only after ``sync_gradients``, so the trainer builds the
container with ``overlap_backward=False`` and every update starts in ``step()``.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from longtrain.offload.direct_io import aligned_buffer, padded

from .config import OptimConfig
from .placement import STAGED, Placement, arrival_order, slot_cost
from .readiness import GradientReadiness
from .staging import Staging
from .subgroup import SubGroup, build_subgroup, work_buffer
from .tiers import CxlTier, NvmeTier, StagedTier

if TYPE_CHECKING:
    from longtrain.parallel.fsdp import ShardedParams


class OptimizerContainer(torch.optim.Optimizer):
    """See the module docstring. Built by ``build_optimizer``."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        defaults: dict[str, Any],
        subgroups: Sequence[Sequence[nn.Parameter]],
        placement: Placement,
        cfg: OptimConfig,
        *,
        cpu_impl: str = "torch",
        cxl_node: int | None = None,
        overlap_backward: bool = True,
        shards: ShardedParams | None = None,
    ):
        super().__init__(groups, defaults)
        self._shards = shards  # FSDP: the parameters are local shards (parallel/fsdp.py)
        self.name = cfg.name
        self.max_norm = cfg.grad_clip if cfg.grad_clip > 0 else None
        self.cpu_impl = cpu_impl
        self.placement = placement
        params = [p for sub in subgroups for p in sub]
        self.device = params[0].device
        tiers = placement.tiers
        host_numel = max(
            (sum(p.numel() for p in s) for s, t in zip(subgroups, tiers, strict=True) if t != "device"),
            default=0,
        )
        self._work_buf = work_buffer(params, host_numel)
        self._groups = [
            build_subgroup(
                i,
                list(sub),
                tier,
                self.param_groups,
                algorithm=cfg.name,
                cpu_impl=cpu_impl,
                work_buf=self._work_buf,
            )
            for i, (sub, tier) in enumerate(zip(subgroups, tiers, strict=True))
        ]
        self._order = arrival_order(len(self._groups))
        self._tiers: dict[str, StagedTier] = {}
        self._staging = self._build_staging(cfg, cxl_node)
        self._updater = ThreadPoolExecutor(1, thread_name_prefix="optim-update")
        self._index: dict[Tensor, int] = {p: i for i, p in enumerate(params)}
        self._readiness = GradientReadiness(
            [g.index for g in self._groups for _ in g.params], len(self._groups)
        )
        self._norms: dict[int, Future[list[Tensor]]] = {}  # sub-groups started, and their norms
        self._updates: list[Future[None]] = []
        self._next_update = 0  # position in self._order of the next update to submit
        self._hooks = []
        if overlap_backward and cfg.overlap:
            # The hooks hold the container weakly: a parameter -> hook -> container -> parameter cycle
            # would keep a dropped container (its threads and buffers) alive until a cyclic GC pass.
            this = weakref.ref(self)

            def on_grad(p: Tensor) -> None:
                container = this()
                if container is not None:
                    container._on_grad(p)

            self._hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        self._exposed_s = 0.0  # this step's time on the calling thread so far
        self._update_s = 0.0  # this step's time on the update thread
        self._last = {"optim_exposed_s": 0.0, "optim_update_s": 0.0, "optim_overlapped_subgroups": 0}

    def _build_staging(self, cfg: OptimConfig, cxl_node: int | None) -> Staging | None:
        """The staged tiers that hold sub-groups, and the DRAM slots their updates run in."""
        sizes: dict[str, dict[int, int]] = {}
        for g in self._groups:
            if g.tier in STAGED:
                sizes.setdefault(g.tier, {})[g.index] = g.state_bytes
        if not sizes:
            return None
        largest = max(padded(n) for per_tier in sizes.values() for n in per_tier.values())
        if self.placement.slot_bytes < largest:
            raise ValueError(
                f"placement.slot_bytes={self.placement.slot_bytes} < the largest staged state ({largest})"
            )
        if "nvme" in sizes:
            assert cfg.nvme_dir is not None  # build_optimizer checks it
            self._tiers["nvme"] = NvmeTier(cfg.nvme_dir, sizes["nvme"])
        if "cxl" in sizes:
            self._tiers["cxl"] = CxlTier(sizes["cxl"], cxl_node, cfg.cxl_bandwidth_gbps, cfg.cxl_latency_us)
        pin = self.device.type == "cuda"
        slots = [
            aligned_buffer(self.placement.slot_bytes, pin=pin) for _ in range(self.placement.staging_slots)
        ]
        by_group = {g.index: self._tiers[g.tier] for g in self._groups if g.tier in STAGED}
        return Staging(by_group, self._order, slots)

    # ------------------------------------------------------------------ overlap with backward

    def before_last_backward(self) -> None:
        """The next backward is the last of this step: its gradients are final and may start the
        updates (see the module docstring); the staged tiers start loading now."""
        start = time.perf_counter()
        self._readiness.arm()
        if self._staging is not None:
            self._staging.start()
        self._exposed_s += time.perf_counter() - start

    def _on_grad(self, p: Tensor) -> None:
        g = self._readiness.on_grad(self._index[p])
        if g is None:
            return
        # Sub-group g's gradients are complete: its norms now; without clipping, its update.
        self._norms[g] = self._updater.submit(self._grad_norms, self._groups[g])
        if self.max_norm is None:
            self._submit_updates(None, until_missing=True)

    def _submit_updates(self, coef: Tensor | None, until_missing: bool = False) -> None:
        """Queue updates in arrival order (``until_missing``: up to the first sub-group not started)."""
        while self._next_update < len(self._order):
            g = self._order[self._next_update]
            if until_missing and g not in self._norms:
                return
            self._updates.append(self._updater.submit(self._update, self._groups[g], coef))
            self._next_update += 1

    # ------------------------------------------------------------------ the step

    @staticmethod
    def _grad_norms(g: SubGroup) -> list[Tensor]:
        grads = [p.grad for p in g.params if p.grad is not None]
        return list(torch._foreach_norm(grads, 2.0)) if grads else []

    @torch.no_grad()
    def step(self, closure: Any = None) -> float:  # type: ignore[override]
        """Clip (``optim.grad_clip``) and update every sub-group; returns the global gradient norm
        before clipping. Gradients are left in place (``zero_grad`` or ``clip_and_step`` drop them)."""
        if closure is not None:
            raise TypeError("the optimizer container does not take a closure")
        start = time.perf_counter()
        overlapped, done = len(self._norms), False
        if self._shards is not None:
            self._shards.pull_grads()
        try:
            for g in self._order:
                if g not in self._norms:
                    self._norms[g] = self._updater.submit(self._grad_norms, self._groups[g])
            norms = [n for g in range(len(self._groups)) for n in self._norms[g].result()]
            total = (
                torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
                if norms
                else torch.zeros((), device=self.device)
            )
            if self._shards is not None:  # the norm of the full gradients: sum the shards' squares
                total = self._shards.all_reduce_sum(total.square()).sqrt()
            coef = None
            if self.max_norm is not None:
                coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
            self._submit_updates(coef)
            for f in self._updates:
                f.result()
            done = True
        finally:  # on an error too: nothing of this step may still run when the next one starts
            self._readiness.disarm(record=done)  # this step's counts: the next step's expectation
            pending: list[Future[Any]] = [*self._norms.values(), *self._updates]
            futures.wait(pending)
            self._norms.clear()
            self._updates.clear()
            self._next_update = 0
            if self._staging is not None:
                self._staging.finish()
        self._last = {
            "optim_exposed_s": self._exposed_s + time.perf_counter() - start,
            "optim_update_s": self._update_s,  # this step's, started in backward or here
            "optim_overlapped_subgroups": overlapped,
        }
        self._exposed_s = self._update_s = 0.0
        return float(total.item())

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._shards is not None:
            self._shards.drop_grads()

    def clip_and_step(self) -> float:
        """``step()`` then ``zero_grad()``: the global gradient norm before clipping."""
        norm = self.step()
        self.zero_grad(set_to_none=True)
        return norm

    def _update(self, g: SubGroup, coef: Tensor | None) -> None:
        start = time.perf_counter()
        slot = self._staging.acquire(g.index) if g.tier in STAGED and self._staging is not None else None
        dirty = False
        try:
            if slot is not None:
                g.bind(slot)
            grads = g.host_grads()
            if grads:
                if coef is not None:
                    torch._foreach_mul_(grads, coef.to(grads[0].device))
                for inner_group, gi in zip(g.inner.param_groups, g.inner_public, strict=True):
                    for k in self.defaults:  # the scheduler sets lr on the public groups
                        inner_group[k] = self.param_groups[gi][k]
                g.inner.step()
                dirty = True
                g.copy_back()
        finally:
            if slot is not None:
                assert self._staging is not None
                self._staging.release(g.index, dirty)
        self._update_s += time.perf_counter() - start

    # ------------------------------------------------------------------ state and statistics

    @contextlib.contextmanager
    def _state_of(self, g: SubGroup, write: bool) -> Iterator[None]:
        """``g``'s state bound where ``g.inner.state`` can read (and, ``write``, change) it."""
        if g.tier not in STAGED or self._staging is None:
            yield
            return
        slot = self._staging.load_now(g.index)
        try:
            g.bind(slot)
            yield
        finally:
            self._staging.release(g.index, dirty=write)
            self._staging.finish()

    def _param_index(self) -> dict[Tensor, int]:
        return {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's (or SGD's) format, whatever the tiers: a state saved with nvme loads
        into a container with dram, into one with another placement, or into torch's optimizer."""
        index = self._param_index()
        state: dict[int, dict[str, Any]] = {}
        for g in self._groups:
            with self._state_of(g, write=False):
                for p, w in zip(g.params, g.work, strict=True):
                    st = g.inner.state.get(w, {})
                    step = st.get("step", None)
                    if not st or (step is not None and float(step) == 0):
                        continue  # never updated: torch keeps no state either
                    entry = {k: self._full(p, v).clone() for k, v in st.items() if isinstance(v, Tensor)}
                    if "step" in st:
                        entry["step"] = torch.tensor(float(step), dtype=torch.float32)
                    state[index[p]] = entry
        groups = [
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [index[p] for p in group["params"]],
            }
            for group in self.param_groups
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(o["params"]) for s, o in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("loaded optimizer state does not match the optimizer's parameter groups")
        saved_index = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
            saved_index.update({p: i for p, i in zip(group["params"], saved["params"], strict=True)})
        for g in self._groups:
            with self._state_of(g, write=True):
                for p, w in zip(g.params, g.work, strict=True):
                    entry = state_dict["state"].get(saved_index[p])
                    if entry is not None and self._shards is not None:
                        entry = {k: self._shard(p, v) for k, v in entry.items()}
                    self._load_entry(g, w, entry)

    def _full(self, p: nn.Parameter, value: Tensor) -> Tensor:
        """A parameter's state as saved: under FSDP the full tensor gathered from the shards (a
        collective: ``state_dict`` runs on every rank), else ``value``."""
        if self._shards is None or value.dim() == 0:
            return value
        return self._shards.full(p, value)

    def _shard(self, p: nn.Parameter, value: Tensor) -> Tensor:
        if self._shards is None or value.dim() == 0:
            return value
        return self._shards.shard(p, value)

    def _load_entry(self, g: SubGroup, w: Tensor, entry: dict[str, Any] | None) -> None:
        st = g.inner.state[w]
        if self.name == "sgd":
            g.inner.state.pop(w, None)
            if entry is not None:
                g.inner.state[w] = {k: v.to(w.device, w.dtype).clone() for k, v in entry.items()}
            return
        step = 0.0 if entry is None else float(entry["step"])
        st["step"] = int(step) if isinstance(st["step"], int) else torch.tensor(step, dtype=torch.float32)
        for k in ("exp_avg", "exp_avg_sq"):
            if entry is None:
                st[k].zero_()
            else:
                st[k].copy_(entry[k])

    def stats(self) -> dict[str, float | str | None]:
        """Bytes per tier, the last step's optimizer time on the critical path, and how the tiers
        were chosen (``optim_placement_solver``: rule | ilp | greedy; the solver's predicted
        exposed time, None where nothing was solved)."""
        per_tier = dict.fromkeys(("device", "dram", "cxl", "nvme"), 0)
        for g in self._groups:
            if g.home is not None:
                per_tier[g.tier] += g.home.numel() * g.home.element_size()
            elif g.tier == "device":  # SGD: momentum buffers
                per_tier["device"] += sum(
                    t.numel() * t.element_size()
                    for st in g.inner.state.values()
                    for t in st.values()
                    if isinstance(t, Tensor)
                )
        per_tier["dram"] += self.placement.staging_slots * slot_cost(self.placement.slot_bytes)
        if self._work_buf is not None:
            per_tier["dram"] += self._work_buf.numel() * self._work_buf.element_size()
        for name, tier in self._tiers.items():
            per_tier[name] += tier.nbytes()
        return {
            **{f"optim_{t}_bytes": b for t, b in per_tier.items()},
            **self._last,
            "optim_placement_solver": self.placement.solver,
            "optim_predicted_exposed_s": self.placement.predicted_exposed_s,
        }

    def close(self) -> None:
        """Stop the threads, remove the hooks, delete the NVMe file, free CXL memory."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._updater.shutdown(wait=True)
        if self._staging is not None:
            self._staging.close()
        for tier in self._tiers.values():
            tier.close()

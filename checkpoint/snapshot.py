"""In-memory snapshots in the trainer: a ``Checkpointer`` that takes a lazy snapshot of the whole
training state into this rank's snapshot agent every ``checkpoint.snapshot_every`` steps, and
keeps the synchronous disk checkpoints (``checkpoint.every``) alongside.

A snapshot holds the model's and the optimizer's state (the optimizer's ``state_dict`` gathers
every tier), the LR scheduler, the step, the RNG states (torch CPU and CUDA, Python, NumPy) and
the data loader's position, flattened into named tensors plus a JSON tree (``flat.py``; no
pickle). ``save`` captures what is cheap (scheduler, loader, RNG: small; the optimizer's
``state_dict``, which copies) and starts a background copy into the agent's slot
(``LazySnapshot``); the parameters are read while the next forward/backward runs, and ``wait``,
which the loop calls before the optimizer step, is where it pays for what is left.

Resume (``checkpoint.resume=auto``): every rank reads the headers of its agent's two slots; the
ranks agree on the newest step all of them hold (one all-reduce); it is taken when it is newer
than the newest verified disk checkpoint, else the disk checkpoint is. Slots of other steps are
then discarded, so a snapshot of the abandoned timeline (steps past the resumed one) is never
resumed from later. The agent is started at the first snapshot, not before: a run that takes
none starts no process. When no agent can be started or reached, training goes on with disk
checkpoints only and says so in one line.

Not yet: parity across ranks (``checkpoint.ec`` is checked only), persistence by the agents,
sharded states (``parallel.shard=fsdp`` takes disk checkpoints only; the config refuses the
combination).
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from .agent import SHM_ROOT, AgentClient, AgentError, LazySnapshot, agent_dir, agent_paths
from .config import CheckpointConfig
from .flat import flatten, unflatten
from .protocol import Restored, TrainState
from .slots import COMPLETE, Slot, SlotPair, Snapshot, required_bytes
from .sync import SyncCheckpointer, step_of

if TYPE_CHECKING:
    from longtrain.parallel import Mesh

# An agent whose trainer is gone keeps its snapshots this long for a re-run, then frees the memory.
AGENT_IDLE_EXIT_S = 1800.0


def rng_state() -> dict[str, Any]:
    """Every RNG the training may draw from, as tensors and JSON values."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = cast(tuple, np.random.get_state())  # the legacy tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _say(message: str) -> None:
    print(f"longtrain: {message}", file=sys.stderr, flush=True)


class SnapshotCheckpointer:
    """A ``Checkpointer``: lazy in-memory snapshots in this rank's agent every ``snapshot_every``
    steps, disk checkpoints (``disk``) every ``checkpoint.every``; resumes from whichever is newer."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        output_dir: str,
        mesh: Mesh,
        model_config: dict[str, Any],
        disk: SyncCheckpointer,
        shm_root: Path = SHM_ROOT,
    ):
        assert cfg.snapshot_every is not None
        self.cfg, self.mesh, self.model_config, self.disk = cfg, mesh, model_config, disk
        self.every = cfg.snapshot_every
        self.output_dir, self.shm_root = output_dir, shm_root
        self.directory = agent_dir(output_dir, shm_root, create=False)
        self.client: AgentClient | None = None
        self.lazy: LazySnapshot | None = None
        self.off = False  # no agent could be started or reached: disk checkpoints only
        self.finished = False  # the last step's checkpoint is written: the agent may go
        self._disk_due = False

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int, total_steps: int) -> bool:
        self._disk_due = self.disk.should_save(step, total_steps)
        self.finished = self._disk_due and step == total_steps
        return self._disk_due or (not self.off and step % self.every == 0)

    def save(self, step: int, state: TrainState) -> None:
        if self._disk_due:  # a snapshot of this step would be no newer than the checkpoint
            self.disk.save(step, state)
            return
        if self.off:
            return
        tensors, meta = self._capture(step, state)
        need = required_bytes(tensors, meta)
        try:
            if self.client is None:
                directory = agent_dir(self.output_dir, self.shm_root)  # created private here
                try:
                    self.client = AgentClient.start(directory, self.mesh.rank, AGENT_IDLE_EXIT_S)
                except AgentError:
                    with contextlib.suppress(OSError):  # no agent: leave no empty directory behind
                        directory.rmdir()
                    raise
            if self.lazy is None:
                self.lazy = LazySnapshot(self.client.slots(need))
            elif min(s.size for s in self.lazy.pair.slots) < need:  # a grown state: new, bigger slots
                self.lazy.wait()
                self.lazy.pair.close()
                self.lazy.pair = self.client.slots(need)
        except (AgentError, OSError) as e:
            self.off = True
            _say(f"rank {self.mesh.rank}: no snapshot agent ({e}); continuing with disk checkpoints only")
            return
        self.lazy.start(step, tensors, meta)

    def wait(self) -> None:
        if self.lazy is not None:
            self.lazy.wait()

    def _capture(self, step: int, state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, tree = flatten(
            {
                "model": state.model.state_dict(),  # the parameters themselves: copied lazily
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "data": state.data.state_dict(),
                "rng": rng_state(),
            },
            "",
        )
        meta = {
            "step": step,
            "tree": tree,
            "model_config": self.model_config,
            "world_size": self.mesh.world_size,
        }
        return tensors, meta

    # ------------------------------------------------------------------ resuming

    def load(self, state: TrainState) -> Restored | None:
        self._connect()
        disk_path = self.disk.agreed_resume()
        if self.cfg.resume != "auto":
            self._discard(keep=None)
            return None if disk_path is None else self.disk.load_from(disk_path, state)
        disk_step = -1 if disk_path is None else step_of(disk_path)
        step = self._agreed_step()
        if step is not None and step > disk_step:
            restored = self._restore(step, state)
            if restored is not None:
                return restored
        self._discard(keep=None)
        return None if disk_path is None else self.disk.load_from(disk_path, state)

    def _connect(self) -> None:
        """Reconnect to the agent a previous run of this job left (none: a fresh run, or gone)."""
        rank = self.mesh.rank
        sock, slot_paths = agent_paths(self.directory, rank)
        if not sock.exists():
            return  # a fresh run, or its agent exited after its last step
        try:
            agent_dir(self.output_dir, self.shm_root)  # still ours and private
            self.client = AgentClient.connect(self.directory, rank)
        except OSError as e:
            _say(f"rank {rank}: cannot reach the snapshot agent ({e}); resuming from disk checkpoints only")
            return
        if self.client is None:
            _say(
                f"rank {rank}: the snapshot agent of the previous run is gone; resuming from disk checkpoints only"
            )
        elif all(p.is_file() and p.stat().st_size > 0 for p in slot_paths):
            self.lazy = LazySnapshot(SlotPair(slot_paths))

    def _usable(self) -> list[tuple[int, Slot]]:
        """(step, slot) of this rank's complete slots."""
        if self.lazy is None:
            return []
        return [(h[2], s) for s in self.lazy.pair.slots if (h := s.header())[0] == COMPLETE]

    def _agreed_step(self) -> int | None:
        """The newest snapshot step every rank holds (an all-reduce of each rank's two steps)."""
        from longtrain.parallel import all_reduce_sums

        steps = [0.0] * (2 * self.mesh.world_size)  # step + 1 per slot; 0: none
        for i, (step, _) in enumerate(self._usable()):
            steps[2 * self.mesh.rank + i] = step + 1.0
        totals = all_reduce_sums(steps, self.mesh)
        held = [{int(s) - 1 for s in totals[2 * r : 2 * r + 2] if s > 0} for r in range(self.mesh.world_size)]
        common = set.intersection(*held)
        return max(common) if common else None

    def _restore(self, step: int, state: TrainState) -> Restored | None:
        """Read snapshot ``step`` on every rank and load it, if every rank's copy verifies."""
        from longtrain.parallel import all_reduce_sum

        slot = next(s for st, s in self._usable() if st == step)
        got = slot.read()
        problem = got if isinstance(got, str) else self._mismatch(got)
        if all_reduce_sum(problem is not None, self.mesh) > 0:
            if problem is not None:
                _say(f"rank {self.mesh.rank}: skipping snapshot of step {step} in {slot.path}: {problem}")
            return None
        assert isinstance(got, Snapshot)
        full = unflatten(got.meta["tree"], got.tensors)
        state.model.load_state_dict(full["model"])
        state.optimizer.load_state_dict(full["optimizer"])
        state.scheduler.load_state_dict(full["scheduler"])
        state.data.load_state_dict(full["data"])
        set_rng_state(full["rng"])
        self._discard(keep=slot)
        return Restored(step=step, data_state=full["data"], path=slot.path, source="agent memory")

    def _mismatch(self, snap: Snapshot) -> str | None:
        if snap.meta.get("model_config") != self.model_config:
            return "it was taken of a different model"
        if snap.meta.get("world_size") != self.mesh.world_size:
            return f"it was taken by {snap.meta.get('world_size')} ranks, this run has {self.mesh.world_size}"
        return None

    def _discard(self, keep: Slot | None) -> None:
        for _, slot in self._usable():
            if slot is not keep:
                slot.discard()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Finish the copy in flight. After the last step (its disk checkpoint written) the agent
        is stopped and its memory freed; otherwise (a failure) it keeps the snapshots for a re-run."""
        try:
            self.wait()
        finally:
            if self.lazy is not None:
                self.lazy.pair.close()
                self.lazy = None
            if self.client is not None:
                try:
                    if self.finished:
                        self.client.shutdown()
                    else:
                        self.client.disconnect()
                except (AgentError, OSError):
                    pass  # an agent that died meanwhile has nothing left to release
                self.client = None
            self.disk.close()

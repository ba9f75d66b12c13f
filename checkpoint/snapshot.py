"""In-memory snapshots in the trainer: a ``Checkpointer`` that takes a lazy snapshot of the whole
training state into this rank's snapshot agent every ``checkpoint.snapshot_every`` steps, and has
the agents persist one to disk every ``checkpoint.every`` steps.

A snapshot holds the model's and the optimizer's state (the optimizer's ``state_dict`` gathers
every tier), the LR scheduler, the step, the RNG states (torch CPU and CUDA, Python, NumPy) and
the data loader's position, flattened into named tensors plus a JSON tree (``flat.py``; no
pickle). ``save`` captures what is cheap (scheduler, loader, RNG: small; the optimizer's
``state_dict``, which copies) and starts a background copy into the agent's slot
(``LazySnapshot``); the parameters are read while the next forward/backward runs, and ``wait``,
which the loop calls before the optimizer step, is where it pays for what is left.

Persistence (``persist.py``): a step due on disk (``checkpoint.every``, the last step, SIGTERM)
is snapshotted like any other, and once the copy is in the slot the copy thread asks the agent to
persist it; the agents write the checkpoint's files from the slots (the synchronous format, so
resume and export read it unchanged) and rank 0's agent seals it when every rank's part is there.
The trainer waits for that only when it must: before it asks for the next persist (one at a time),
at the last step and on SIGTERM (the run ends with its checkpoint on disk), and before it writes a
snapshot into the slot its agent still reads. One all-reduce per persisted step agrees on the way:
if any rank has no agent, every rank goes back to the synchronous checkpointer for that step.

Parity across ranks (``checkpoint.ec``, xor by default; ``rank_parity.py`` has the layout): on
the same background thread, once its slot is written, every rank sends the stripes of its
snapshot to the ranks that keep their group's parity (an ``all_to_all`` on a gloo group of its
own, so it never interleaves with the training's collectives on the world group), codes the
stripes it receives and writes its parity shards into the agent's two parity slots (crc32 per
shard, completion mark last, tagged with the step). xor over N ranks keeps 1/(N-1) of a snapshot
per rank; ``stats()`` puts ``snapshot_bytes`` and ``snapshot_parity_bytes`` in the metrics. A rank
that takes no snapshot (no agent, a failed write) still joins the exchange and says so: nobody
keeps parity of that step, and nobody waits for it. One rank: nothing to code.

Resume (``checkpoint.resume=auto``): every rank reads the headers of its agent's slots (and
verifies the parity it holds); one all-reduce tells every rank which steps each rank holds. The
newest step newer than the newest verified disk checkpoint is taken if every rank holds it or
parity rebuilds it: the ranks that lost it (a node lost with its agent's memory) get the shards
they need from the others (one ``all_to_all``), decode their snapshot's image, write it into a
slot of a new agent and read it back through its checksums; then the snapshot is coded again,
since the lost ranks' parity went with them. Otherwise the disk checkpoint is taken. Slots of
other steps (snapshot and parity) are then discarded, so a snapshot of the abandoned timeline
(steps past the resumed one) is never resumed from later. The agent is started at the first
snapshot, not before: a run that takes none starts no process. When no agent can be started or
reached, training goes on with disk checkpoints only and says so in one line.

Not yet: the parity is computed by the trainer's copy thread, not by the agents; sharded states
(``parallel.shard=fsdp`` takes disk checkpoints only; the config refuses the combination),
resuming snapshots on another number of ranks (disk checkpoints do, the agents' included).
"""

from __future__ import annotations

import contextlib
import functools
import random
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist

from .agent import SHM_ROOT, AgentClient, AgentError, LazySnapshot, agent_dir, agent_paths, parity_paths
from .config import CheckpointConfig
from .flat import flatten, unflatten
from .parity import ErasureCode
from .persist import PART_TIMEOUT_S, mark_failed, tied_names, tmp_dir
from .protocol import Restored, TrainState
from .rank_parity import RankParity, RebuildError, exchange_parity, exchange_rebuild
from .slots import COMPLETE, Slot, SlotPair, Snapshot, required_bytes
from .sync import SyncCheckpointer, step_dir, step_of

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


Held = list[tuple[set[int], set[int]]]  # per rank: its snapshot steps, the steps of the parity it holds


def newest_restorable(
    held: Held, disk_step: int, layout: RankParity | None, ec: str
) -> tuple[int | None, list[str]]:
    """The newest snapshot step newer than the disk checkpoint that every rank holds, or that
    parity rebuilds where ranks lost it (the same answer on every rank: ``held`` is agreed), and
    why each newer one cannot be used."""
    skipped: list[str] = []
    for step in sorted(set().union(*(data for data, _ in held)), reverse=True):
        if step <= disk_step:
            break
        have_data = [step in data for data, _ in held]
        if all(have_data):
            return step, skipped
        if layout is None:
            why = f"checkpoint.ec={ec} keeps no parity across ranks"
        else:
            try:
                layout.rebuild_plan(have_data, [step in parity for _, parity in held])
                return step, skipped
            except RebuildError as e:
                why = str(e)
        lost = [r for r, has in enumerate(have_data) if not has]
        skipped.append(f"snapshot of step {step}: ranks {lost} lost it and it cannot be rebuilt ({why})")
    return None, skipped


def _say(message: str) -> None:
    print(f"longtrain: {message}", file=sys.stderr, flush=True)


class SnapshotCheckpointer:
    """A ``Checkpointer``: lazy in-memory snapshots in this rank's agent every ``snapshot_every``
    steps, disk checkpoints every ``checkpoint.every`` persisted by the agents (by ``disk``, the
    synchronous checkpointer, when a rank has no agent); resumes from whichever is newer."""

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
        self._said_sync = False
        self.pending: tuple[int, Path] | None = None  # the persist asked of the agent: step, temp dir
        # Parity across ranks: the layout, a gloo group of its own (the exchange runs on the copy
        # thread while the training's collectives run on the world group), the parity slots.
        self.layout = RankParity.build(ErasureCode.parse(cfg.ec), mesh.world_size)
        self.group: dist.ProcessGroup | None = None
        if self.layout is not None:
            self.group = dist.new_group(backend="gloo")  # every rank builds its checkpointer here
        self.parity: SlotPair | None = None
        self._exchange: threading.Thread | None = None  # a rank without an agent still joins it
        self.sizes: dict[str, float] = {}  # of the last snapshot: its bytes and its parity's

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int, total_steps: int) -> bool:
        self._disk_due = self.disk.should_save(step, total_steps)
        self.finished = self._disk_due and step == total_steps
        return self._disk_due or (not self.off and step % self.every == 0)

    def save(self, step: int, state: TrainState) -> None:
        if self._disk_due:  # a snapshot that the agents persist, or else a synchronous checkpoint
            if not self._persist_by_agents(step, state):
                self.disk.save(step, state)
            elif self.finished:  # the last step: the run ends once its checkpoint is on disk
                self._await_persisted(step, state)
            return
        if self.off:
            self._join_exchange_without_snapshot()
            return
        prepared = self._prepare(step, state)
        if prepared is None:
            self._join_exchange_without_snapshot()
            return
        assert self.lazy is not None
        self.lazy.start(step, *prepared, then=functools.partial(self._written, step, None), before=self._hold)

    def _prepare(self, step: int, state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Capture the state and make sure this rank's agent and slots can take it; None (and
        disk checkpoints only from now on, said in one line) when no agent can be started or reached."""
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
                self._persisted()  # the agent may still read the old slots
                self.lazy.pair.close()
                self.lazy.pair = self.client.slots(need)
        except (AgentError, OSError) as e:
            self._agent_lost(f"no snapshot agent ({e}); continuing with disk checkpoints only")
            return None
        return tensors, meta

    def _agent_lost(self, why: str) -> None:
        self.off = True
        _say(f"rank {self.mesh.rank}: {why}")
        if self.pending is not None:  # the sealing agent must not wait for this rank's part
            mark_failed(
                self.pending[1], self.mesh.rank, f"the snapshot agent of rank {self.mesh.rank} is gone"
            )
            self.pending = None

    # ------------------------------------------------------------------ persistence by the agents

    def _persist_by_agents(self, step: int, state: TrainState) -> bool:
        """Every rank: snapshot ``step`` and have the agents write it to disk (``persist.py``), if
        every rank's agent can; False (nothing started) when some cannot: the caller then writes
        it synchronously. One all-reduce: whether all can, and the checkpoint's temp-dir token."""
        from longtrain.parallel import all_reduce_sums

        prepared = None
        if not self.off:
            self.wait()
            self._persisted()  # one persist at a time: the previous one is finished (or given up) first
            prepared = None if self.off else self._prepare(step, state)
        token = secrets.randbits(48) if self.mesh.is_main else 0  # not the training's RNGs
        cannot, total = all_reduce_sums([float(prepared is None), float(token)], self.mesh)
        if cannot > 0:
            # once: a rank that lost its agent said so itself; in a multi-rank job the others learn
            # here why their disk checkpoints are back with the trainer
            if self.mesh.is_main and self.mesh.world_size > 1 and not self._said_sync:
                _say(
                    f"step {step}: {int(cannot)} of {self.mesh.world_size} ranks have no snapshot agent; the "
                    "trainer writes disk checkpoints itself (synchronously) while any rank has none"
                )
            self._said_sync = True
            return False
        assert prepared is not None and self.lazy is not None
        token_hex = f"{int(total):012x}"
        job = {
            "step": step,
            "root": str(self.disk.root),
            "token": token_hex,
            "rank": self.mesh.rank,
            "world": self.mesh.world_size,
            "keep": self.cfg.keep,
            "seal": self.mesh.is_main,
            "timeout": PART_TIMEOUT_S,
        }
        self.pending = (step, tmp_dir(self.disk.root, step, token_hex))
        self.lazy.start(step, *prepared, then=functools.partial(self._written, step, job), before=self._hold)
        return True

    def _persisted(self) -> str | None:
        """Wait until this rank's agent has finished the persist asked for last (its part written;
        on rank 0 the checkpoint sealed) and say if it failed; what went wrong, None if nothing."""
        if self.pending is None or self.client is None:
            return None
        step, _ = self.pending
        try:
            outcome = self.client.request(op="persisted")
        except (AgentError, OSError) as e:
            self._agent_lost(f"the snapshot agent is gone ({e}); continuing with disk checkpoints only")
            return str(e)
        self.pending = None
        failed = outcome.get("failed")
        if outcome.get("step") != step:
            failed = f"the agent has no record of it (its last persist: step {outcome.get('step')})"
        if failed is not None:
            _say(f"rank {self.mesh.rank}: persisting the checkpoint of step {step} failed: {failed}")
        return failed

    def _await_persisted(self, step: int, state: TrainState) -> Path:
        """Every rank, after ``_persist_by_agents(step)``: return once checkpoint ``step`` is sealed;
        if any rank's part failed, write it synchronously instead (the state is still that of step)."""
        from longtrain.parallel import all_reduce_sum

        try:
            self.wait()  # the copy done and the persist asked for
        except (AgentError, OSError) as e:
            _say(f"rank {self.mesh.rank}: the snapshot of step {step} failed ({e})")
        failed = self._persisted()
        final = step_dir(self.disk.root, step)
        if all_reduce_sum(failed is not None, self.mesh) > 0:
            if self.mesh.is_main:
                _say(
                    f"step {step}: the agents could not persist this checkpoint; the trainer writes it (synchronously)"
                )
            self.disk.save(step, state)
        self.disk.saved_step = step
        return final

    def _written(self, step: int, job: dict[str, Any] | None, slot: Slot | None) -> None:
        """On the copy thread, after snapshot ``step`` is in ``slot`` (None: the write failed):
        ask the agent to persist it (``job``), then code parity across ranks."""
        if job is not None:
            self._ask_persist(job, slot)
        image = None if slot is None else slot.image()
        if image is not None:
            self.sizes = {"snapshot_bytes": image.numel()}
        if self.layout is not None:
            self._encode_parity(step, slot)

    def _ask_persist(self, job: dict[str, Any], slot: Slot | None) -> None:
        assert self.pending is not None
        try:
            if slot is None:
                raise AgentError("its snapshot could not be written")
            assert self.client is not None
            self.client.request(op="persist", job={**job, "slot": str(slot.path)})
        except (AgentError, OSError) as e:
            mark_failed(self.pending[1], self.mesh.rank, str(e))

    def _hold(self, slot: Slot) -> None:
        """On the copy thread, before ``slot`` is written: wait until the agent no longer reads it
        (it may still be persisting the snapshot the slot holds)."""
        if self.client is not None:
            with contextlib.suppress(AgentError, OSError):  # no agent: nobody reads it
                self.client.request(op="hold", slot=str(slot.path))

    def wait(self) -> None:
        if self._exchange is not None:
            self._exchange.join()
            self._exchange = None
        if self.lazy is not None:
            self.lazy.wait()

    def persist(self, step: int, state: TrainState) -> Path | None:
        """Checkpoint ``step`` on disk, returning once it is there (preemption): persisted by the
        agents if they can (a trainer killed meanwhile does not stop them), else synchronously.
        Once it is written the agents have nothing newer to keep: ``close`` stops them."""
        self.wait()
        if not self.cfg.enabled:
            return None
        if self.disk.saved_step == step:
            path: Path | None = step_dir(self.disk.root, step)
        elif self.pending is not None and self.pending[0] == step:
            path = self._await_persisted(step, state)
        elif self._persist_by_agents(step, state):
            path = self._await_persisted(step, state)
        else:
            path = self.disk.persist(step, state)
        self.finished = path is not None
        return path

    def stats(self) -> dict[str, float]:
        """This rank's last snapshot and the parity it keeps for the others' (bytes)."""
        return dict(self.sizes)

    def _encode_parity(self, step: int, slot: Slot | None) -> None:
        """Every rank, after writing snapshot ``step`` (``slot``; None: its write failed): the
        exchange of stripes, then this rank's parity shards into its parity slots."""
        assert self.layout is not None
        image = None if slot is None else slot.image()
        got = exchange_parity(self.layout, self.mesh.rank, image, self.group)
        if got is None or self.client is None:
            return  # some rank has no snapshot of this step: no parity for it
        parity, lengths, size = got
        tensors = {f"group{g}": t for g, t in parity.items()}
        meta = {
            "step": step,
            "lengths": lengths,
            "stripe_bytes": size,
            "ec": self.layout.code_name,
            "world_size": self.layout.world,
        }
        need = required_bytes(tensors, meta)
        if self.parity is None or min(s.size for s in self.parity.slots) < need:
            if self.parity is not None:
                self.parity.close()
            self.parity = self.client.slots(need, kind="parity")
        self.parity.write(step, tensors, meta)
        self.sizes = {"snapshot_bytes": lengths[self.mesh.rank], "snapshot_parity_bytes": len(parity) * size}

    def _join_exchange_without_snapshot(self) -> None:
        """A rank that takes no snapshot (no agent) still joins the parity exchange the others
        run, saying it has none (so nobody keeps parity of this step, and nobody waits forever)."""
        if self.layout is None:
            return
        self.wait()
        layout, rank, group = self.layout, self.mesh.rank, self.group
        self._exchange = threading.Thread(
            target=exchange_parity, args=(layout, rank, None, group), name="longtrain-parity", daemon=True
        )
        self._exchange.start()

    def _capture(self, step: int, state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model_state = state.model.state_dict()
        tensors, tree = flatten(
            {
                "model": model_state,  # the parameters themselves: copied lazily
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
            "tied": tied_names(model_state),  # stored once on disk, as the synchronous checkpointer does
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
        held = self._held()
        step, skipped = newest_restorable(held, disk_step, self.layout, self.cfg.ec)
        if self.mesh.is_main:
            for line in skipped:
                _say(line)
        if step is not None:
            restored = self._restore(step, held, state)
            if restored is not None:
                return restored
        self._discard(keep=None)
        return None if disk_path is None else self.disk.load_from(disk_path, state)

    def _connect(self) -> None:
        """Reconnect to the agent a previous run of this job left (none: a fresh run, or gone)."""
        rank = self.mesh.rank
        sock, slot_paths = agent_paths(self.directory, rank)
        if not sock.exists():
            return  # a fresh run, its agent exited after its last step, or its node is gone
        try:
            agent_dir(self.output_dir, self.shm_root)  # still ours and private
            self.client = AgentClient.connect(self.directory, rank)
        except OSError as e:
            _say(f"rank {rank}: cannot reach the snapshot agent ({e}); resuming from disk checkpoints only")
            return
        if self.client is None:
            _say(f"rank {rank}: the snapshot agent of the previous run is gone; its snapshots are lost")
            return
        if all(p.is_file() and p.stat().st_size > 0 for p in slot_paths):
            self.lazy = LazySnapshot(SlotPair(slot_paths))
        held_parity = parity_paths(self.directory, rank)
        if all(p.is_file() and p.stat().st_size > 0 for p in held_parity):
            self.parity = SlotPair(held_parity)

    def _usable(self) -> list[tuple[int, Slot]]:
        """(step, slot) of this rank's complete slots."""
        if self.lazy is None:
            return []
        return [(h[2], s) for s in self.lazy.pair.slots if (h := s.header())[0] == COMPLETE]

    def _parity_of(self, step: int) -> Snapshot | None:
        """This rank's parity of snapshot ``step``, if it holds it, it verifies and it was coded
        with this run's layout (a run with another checkpoint.ec or number of ranks cannot use it)."""
        if self.layout is None or self.parity is None:
            return None
        slot = self.parity.holding(step)
        got = None if slot is None else slot.read()
        if not isinstance(got, Snapshot):
            return None
        layout = (got.meta.get("ec"), got.meta.get("world_size"))
        return got if layout == (self.layout.code_name, self.layout.world) else None

    def _held(self) -> Held:
        """Per rank: the steps of its complete snapshots and of the parity it holds that verifies
        (one all-reduce of every rank's two plus two steps)."""
        from longtrain.parallel import all_reduce_sums

        n, rank = self.mesh.world_size, self.mesh.rank
        steps = [0.0] * (4 * n)  # step + 1 per slot; 0: none
        for i, (step, _) in enumerate(self._usable()):
            steps[4 * rank + i] = step + 1.0
        parity_steps = (
            []
            if self.parity is None
            else [h[2] for s in self.parity.slots if (h := s.header())[0] == COMPLETE]
        )
        for i, step in enumerate(parity_steps):
            if self._parity_of(step) is not None:
                steps[4 * rank + 2 + i] = step + 1.0
        totals = all_reduce_sums(steps, self.mesh)
        return [
            (
                {int(s) - 1 for s in totals[4 * r : 4 * r + 2] if s > 0},
                {int(s) - 1 for s in totals[4 * r + 2 : 4 * r + 4] if s > 0},
            )
            for r in range(n)
        ]

    def _restore(self, step: int, held: Held, state: TrainState) -> Restored | None:
        """Load snapshot ``step`` on every rank (rebuilding it first where ranks lost it), if every
        rank's copy verifies."""
        from longtrain.parallel import all_reduce_sum

        rebuild = not all(step in data for data, _ in held)
        problem = self._rebuild(step, held) if rebuild else None
        slot = None if self.lazy is None else self.lazy.pair.holding(step)
        got: Snapshot | str = problem or ("missing" if slot is None else slot.read())
        problem = got if isinstance(got, str) else self._mismatch(got)
        if all_reduce_sum(problem is not None, self.mesh) > 0:
            if problem is not None:
                where = "" if slot is None else f" in {slot.path}"
                _say(f"rank {self.mesh.rank}: skipping snapshot of step {step}{where}: {problem}")
            return None
        assert isinstance(got, Snapshot) and slot is not None
        full = unflatten(got.meta["tree"], got.tensors)
        state.model.load_state_dict(full["model"])
        state.optimizer.load_state_dict(full["optimizer"])
        state.scheduler.load_state_dict(full["scheduler"])
        state.data.load_state_dict(full["data"])
        set_rng_state(full["rng"])
        self._discard(keep=slot)
        if rebuild:  # the lost ranks' parity is gone too: code this snapshot again
            self._encode_parity(step, slot)
        return Restored(step=step, data_state=full["data"], path=slot.path, source="agent memory")

    def _rebuild(self, step: int, held: Held) -> str | None:
        """Every rank: give the ranks that lost snapshot ``step`` what they need, and on those
        ranks rebuild it into a slot of a new agent. Returns what went wrong on this rank."""
        assert self.layout is not None
        n, rank = self.mesh.world_size, self.mesh.rank
        have_data = [step in data for data, _ in held]
        have_parity = [step in parity for _, parity in held]
        start = time.perf_counter()
        mine = self._parity_of(step) if have_parity[rank] else None
        # image lengths and stripe size, as the lowest rank holding parity of this step recorded them
        info = torch.zeros(n + 1, dtype=torch.int64)
        if rank == have_parity.index(True):
            assert mine is not None
            info[:n] = torch.tensor(mine.meta["lengths"])
            info[n] = mine.meta["stripe_bytes"]
        dist.all_reduce(info, group=self.group)
        lengths, size = info[:n].tolist(), int(info[n])
        own = self.lazy.pair.holding(step) if have_data[rank] and self.lazy is not None else None
        rebuilt = exchange_rebuild(
            self.layout,
            rank,
            have_data,
            have_parity,
            None if own is None else own.image(),
            None if mine is None else {int(k.removeprefix("group")): t for k, t in mine.tensors.items()},
            lengths,
            size,
            self.group,
        )
        if rebuilt is None:
            return None
        try:
            if self.client is None:
                directory = agent_dir(self.output_dir, self.shm_root)
                self.client = AgentClient.start(directory, rank, AGENT_IDLE_EXIT_S)
            pair = self.client.slots(rebuilt.numel() + rebuilt.numel() // 4 + 4096)
        except (AgentError, OSError) as e:
            return f"no snapshot agent to hold it after rebuilding it ({e})"
        if self.lazy is not None:
            self.lazy.pair.close()
        self.lazy = LazySnapshot(pair)
        pair.slots[0].write_image(rebuilt)
        _say(
            f"rank {rank}: rebuilt the snapshot of step {step} ({rebuilt.numel()} bytes) from the other "
            f"ranks' snapshots and parity ({self.layout.code_name}) in {time.perf_counter() - start:.2f} s"
        )
        return None

    def _mismatch(self, snap: Snapshot) -> str | None:
        if snap.meta.get("model_config") != self.model_config:
            return "it was taken of a different model"
        if snap.meta.get("world_size") != self.mesh.world_size:
            return f"it was taken by {snap.meta.get('world_size')} ranks, this run has {self.mesh.world_size}"
        return None

    def _discard(self, keep: Slot | None) -> None:
        """Empty every snapshot slot but ``keep`` and every parity slot of another step than its."""
        for _, slot in self._usable():
            if slot is not keep:
                slot.discard()
        kept_step = None if keep is None else keep.header()[2]
        for slot in () if self.parity is None else self.parity.slots:
            state, _, step, *_ = slot.header()
            if state == COMPLETE and step != kept_step:
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
            if self.parity is not None:
                self.parity.close()
                self.parity = None
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

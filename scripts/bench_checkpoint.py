"""Checkpoint stall per snapshot: longtrain's lazy in-memory snapshot against torch.save + fsync
and torch DCP async_save (default stager; a persistent shared-memory stager), plus recovery from
memory vs disk and parity encode vs memcpy (issue 13's benchmark, a first version).

    python scripts/bench_checkpoint.py --quick   # 192 MiB state (16 Mi fp32 parameters + Adam m, v), 10 rounds
    python scripts/bench_checkpoint.py           # 576 MiB state (48 Mi parameters), 12 rounds

A "training step" here is synthetic, not the trainer's: a fixed compute phase (fp32 matmuls of
a fixed count, standing in for forward/backward) then an in-place update of every parameter and
Adam moment (standing in for the optimizer step, the point where a snapshot must be done). Per
round, every system runs one step without a save and one step that saves after the update (the
starting system rotating); stall = (step with save) - (step without), so a background copy that
slows the compute phase counts. For each system: median and p95 over the rounds (first round
dropped: it allocates buffers).
- ``torch_save``: torch.save of the state to a temp file, fsync, rename (blocks);
- ``dcp``: ``dcp.async_save`` with its default stager (created and closed per save), one save
  in flight; what is left of its upload after the next step is waited for untimed (not charged to it,
  and not slowing the other systems' steps);
- ``dcp_stager``: ``dcp.async_save`` with one persistent ``DefaultStager`` (shared memory; pinned
  memory and async staging need CUDA and are off on CPU); ``AsyncCheckpointerType.PROCESS`` is
  not measured (not in this version);
- ``ours``: ``LazySnapshot`` into a ``SlotPair`` in a private /dev/shm directory, started after the
  update, waited on before the next update.
``recovery_mem_vs_disk``: reading the newest snapshot out of the slot vs ``torch.load`` of the
torch_save file after dropping its pages from the page cache (``posix_fadvise(DONTNEED)``; a
cold cache for that file in this VM only: the host's cache under a virtual disk may still hold it). ``parity_vs_memcpy``: XOR parity over 4 shards of the flattened
state (``checkpoint.parity.xor_encode``) in GB/s of input vs ``copy_`` of the same bytes.
Ratios: ours / peer (stall), memory / disk (recovery), parity / memcpy (throughput).

Persisting (``--persist-only`` runs this part alone): the trainer's stall of a step that writes a
disk checkpoint, with longtrain's checkpointers themselves on a model of the same parameter count
(its AdamW state the rest of the bytes): ``sync`` (``SyncCheckpointer``: the trainer writes the
files, fsyncs, hashes and seals before the step ends) and ``agents`` (``SnapshotCheckpointer``:
the snapshot is copied into the agent's slot during the next step and the agent writes and seals
it). Per round, in a fixed order alternating which goes first: a plain step, the step that
persists, the next one, and after an untimed wait for the agent's write to finish (a run that
persists every few steps pays it only when the disk is slower than that) another plain step;
stall = (persisting + next) - (the two plain ones). Also the time the loop spent blocked in the
checkpointer's calls (``wait``, ``save``) in the persisting and the next step, which leaves out
what the background work costs the compute. Each persisted checkpoint is checked to be complete.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import code_version, print_result

from longtrain.checkpoint.agent import LazySnapshot
from longtrain.checkpoint.parity import split, xor_encode
from longtrain.checkpoint.slots import SlotPair, create_slot_file, private_dir, required_bytes

SYSTEMS = ("torch_save", "dcp", "dcp_stager", "ours")
PERSIST_SYSTEMS = ("sync", "agents")
SUBDIRS = ("checkpoint",)


def make_state(params: int, tensor_elems: int = 4 * 2**20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(params // tensor_elems):
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            state[f"{i}.{kind}"] = torch.randn(tensor_elems, generator=g)
    return state


def compute(a: torch.Tensor, reps: int) -> None:
    for _ in range(reps):
        a @ a  # noqa: B018 - the work itself


def update(state: dict[str, torch.Tensor]) -> None:
    for t in state.values():
        t.mul_(0.999)


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class _Position:
    """The data loader's part of a ``TrainState``: a position that moves every step."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def bench_persist(params: int, rounds: int, work: Path) -> dict[str, dict[str, list]]:
    """Per round, for the synchronous checkpointer and the agents: the stall (s) of a persisting
    step, and the time the loop was blocked in the checkpointer's calls (``wait``, ``save``)."""
    from torch import nn

    from longtrain.checkpoint import CheckpointConfig, Checkpointer, SyncCheckpointer, TrainState, is_complete
    from longtrain.checkpoint.snapshot import SnapshotCheckpointer
    from longtrain.parallel import Mesh

    tensor_elems = 4 * 2**20
    g = torch.Generator().manual_seed(1)
    model = nn.ParameterDict(
        {f"p{i}": nn.Parameter(torch.randn(tensor_elems, generator=g)) for i in range(params // tensor_elems)}
    )
    for p in model.values():
        p.grad = torch.randn(tensor_elems, generator=g) * 1e-3  # kept: every step updates with it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = _Position()
    state = TrainState(model, optimizer, scheduler, data)  # type: ignore[arg-type]
    mesh = Mesh(rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    a = torch.randn(512, 512)
    every, steps = 2, 4 * (rounds + 1)
    checkpointers: dict[str, Checkpointer] = {}
    for system in PERSIST_SYSTEMS:
        out = work / f"persist_{system}"
        if system == "sync":
            cfg = CheckpointConfig(every=every, keep=2)
            checkpointers[system] = SyncCheckpointer(cfg, str(out), mesh, {})
        else:
            cfg = CheckpointConfig(every=every, keep=2, snapshot_every=every)
            checkpointers[system] = SnapshotCheckpointer(
                cfg, str(out), mesh, {}, SyncCheckpointer(cfg, str(out), mesh, {})
            )

    def step(system: str, i: int) -> tuple[float, float]:
        """(wall time, time blocked in the checkpointer's calls) of training step ``i``."""
        ckpt = checkpointers[system]
        t0 = time.perf_counter()
        compute(a, 100)  # shorter than the snapshot part's steps: less room for other processes' noise
        t1 = time.perf_counter()
        ckpt.wait()
        blocked = time.perf_counter() - t1
        optimizer.step()
        scheduler.step()
        data.position += 1
        if ckpt.should_save(i, steps):
            t1 = time.perf_counter()
            ckpt.save(i, state)
            blocked += time.perf_counter() - t1
        return time.perf_counter() - t0, blocked

    stalls: dict[str, list[float]] = {s: [] for s in PERSIST_SYSTEMS}
    blocked: dict[str, list[float]] = {s: [] for s in PERSIST_SYSTEMS}
    walls: dict[str, list[list[float]]] = {s: [] for s in PERSIST_SYSTEMS}  # per round: the 4 steps
    for r in range(rounds + 1):
        for k in range(len(PERSIST_SYSTEMS)):
            system = PERSIST_SYSTEMS[(r + k) % len(PERSIST_SYSTEMS)]
            first = 4 * r + 1  # plain, persists (every=2), plain (waits for the copy), plain
            before = step(system, first)
            saving, after = step(system, first + 1), step(system, first + 2)
            final = work / f"persist_{system}" / "checkpoints" / f"step-{first + 1:06d}"
            deadline = time.monotonic() + 600
            while not is_complete(final) and time.monotonic() < deadline:  # untimed: the agent's write
                time.sleep(0.01)
            assert is_complete(final), f"{system} did not persist step {first + 1}"
            plain = step(system, first + 3)
            if r > 0:  # round 0 starts the agent and allocates its slots
                stalls[system].append(saving[0] + after[0] - before[0] - plain[0])
                blocked[system].append(saving[1] + after[1])
                walls[system].append([before[0], saving[0], after[0], plain[0]])
    for ckpt in checkpointers.values():
        ckpt.persist(steps, state)  # the end of a run: the agents are stopped by close()
        ckpt.close()
    return {"stall": stalls, "blocked": blocked, "steps": walls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--persist-only", action="store_true", help="only the persisting step's stall")
    args = parser.parse_args()
    args.code_start = code_version(SUBDIRS)
    params, rounds = (16 * 2**20, 10) if args.quick else (48 * 2**20, 12)
    persist_rounds = 12 if args.quick else 16
    start = time.time()
    if args.persist_only:
        work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=os.environ.get("BENCH_DIR")))
        try:
            persist = bench_persist(params, persist_rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        detail = {"params": params, "rounds": persist_rounds}
        print_result(
            {"detail": detail, **persist_result(persist, detail)}, args, start, "bench_checkpoint.py", SUBDIRS
        )
        return

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=os.environ.get("BENCH_DIR")))
    shm = private_dir(Path("/dev/shm") / f"longtrain-bench-{os.getpid()}")
    dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
    state = make_state(params)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    a = torch.randn(512, 512)
    reps = 200
    slot_paths = (shm / "slot0", shm / "slot1")
    for p in slot_paths:
        create_slot_file(p, required_bytes(state, {}))
    lazy = LazySnapshot(SlotPair(slot_paths))
    stager = DefaultStager(StagingOptions(False, True, False, False))
    pending: dict[str, object] = {}

    def save(system: str, step: int) -> None:
        if system == "torch_save":
            tmp = work / "torch_save.pt.tmp"
            torch.save(state, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            tmp.rename(work / "torch_save.pt")
        elif system in ("dcp", "dcp_stager"):
            if system in pending:
                pending.pop(system).result()  # type: ignore[attr-defined]
            resp = dcp.async_save(
                state,
                checkpoint_id=str(work / system / f"step{step % 2}"),
                async_stager=stager if system == "dcp_stager" else None,
            )
            pending[system] = getattr(resp, "upload_completion", resp)
        else:
            lazy.start(step, state, {"step": step})

    def step(i: int, wait: str | None = None, save_after: str | None = None) -> float:
        """One synthetic step; ``wait``: the system whose copy must be done before the update."""
        t0 = time.perf_counter()
        compute(a, reps)
        if wait == "ours":
            lazy.wait()
        update(state)
        if save_after is not None:
            save(save_after, i)
        return time.perf_counter() - t0

    stalls: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for r in range(rounds + 1):
        for k in range(len(SYSTEMS)):
            system = SYSTEMS[(r + k) % len(SYSTEMS)]
            base = step(r)
            # the step that saves, and the next one (which a background copy slows, and which waits for it)
            pair = step(r, save_after=system) + step(r, wait=system)
            if system in pending:  # untimed: DCP's upload left after the next step does not slow the others'
                pending.pop(system).result()  # type: ignore[attr-defined]
            if r > 0:  # round 0 allocates buffers and files
                stalls[system].append(pair - 2 * base)
    for fut in pending.values():
        fut.result()  # type: ignore[attr-defined]
    stager.close()

    lazy.wait()
    t0 = time.perf_counter()
    snap, _ = lazy.pair.read_newest()
    mem_s = time.perf_counter() - t0
    assert snap is not None
    fadvise_dontneed(work / "torch_save.pt")
    t0 = time.perf_counter()
    torch.load(work / "torch_save.pt", weights_only=True)
    disk_s = time.perf_counter() - t0

    flat = torch.cat([t.view(-1) for t in state.values()]).view(torch.uint8)
    shards = split(flat, 4)
    dst = torch.empty_like(flat)
    xor_s, copy_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        xor_encode(shards)
        xor_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(flat)
        copy_s.append(time.perf_counter() - t0)

    lazy.pair.close()
    shutil.rmtree(shm, ignore_errors=True)
    persist = bench_persist(params, persist_rounds, work)
    shutil.rmtree(work, ignore_errors=True)
    dist.destroy_process_group()

    med = {s: statistics.median(v) for s, v in stalls.items()}
    for s in SYSTEMS:
        print(
            f"{s:>11}: stall median {med[s] * 1e3:8.1f} ms  p95 {p95(stalls[s]) * 1e3:8.1f} ms  (n={len(stalls[s])})"
        )
    print(f"recovery: memory {mem_s:.3f} s, disk (cold) {disk_s:.3f} s")
    parity_gbps, copy_gbps = nbytes / min(xor_s) / 1e9, nbytes / min(copy_s) / 1e9
    print(f"xor parity {parity_gbps:.2f} GB/s, memcpy {copy_gbps:.2f} GB/s")

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else float("inf")

    result: dict = {
        "detail": {
            "state_bytes": nbytes,
            "rounds": rounds,
            "stall_median_s": med,
            "stall_p95_s": {s: p95(v) for s, v in stalls.items()},
            "recovery_s": {"memory": mem_s, "disk_cold": disk_s},
            "gbps": {"xor_parity": parity_gbps, "memcpy": copy_gbps},
        },
        "stall_vs_torch_save": ratio(med["ours"], med["torch_save"]),
        "stall_vs_dcp": ratio(med["ours"], med["dcp"]),
        "stall_vs_dcp_stager": ratio(med["ours"], med["dcp_stager"]),
        "recovery_mem_vs_disk": ratio(mem_s, disk_s),
        "parity_vs_memcpy": ratio(parity_gbps, copy_gbps),
    }
    result.update(persist_result(persist, result["detail"]))
    print_result(result, args, start, "bench_checkpoint.py", SUBDIRS)


def persist_result(persist: dict[str, dict[str, list]], detail: dict) -> dict:
    """Print the persisting stalls; their key (``persist_stall_agents_vs_sync``: medians), the
    figures themselves into ``detail``."""
    stalls, blocked = persist["stall"], persist["blocked"]
    med = {s: statistics.median(v) for s, v in stalls.items()}
    med_blocked = {s: statistics.median(v) for s, v in blocked.items()}
    for s in PERSIST_SYSTEMS:
        print(
            f"persist {s:>6}: stall median {med[s] * 1e3:8.1f} ms  p95 {p95(stalls[s]) * 1e3:8.1f} ms  "
            f"(n={len(stalls[s])}: {', '.join(f'{x * 1e3:.0f}' for x in stalls[s])}); blocked in the "
            f"checkpointer median {med_blocked[s] * 1e3:.1f} ms"
        )
    detail.update(
        persist_stall_median_s=med,
        persist_stall_s=stalls,
        persist_blocked_median_s=med_blocked,
        persist_blocked_s=blocked,
        persist_steps_s=persist["steps"],  # per round: plain, persisting, next, plain
        load_avg=os.getloadavg(),
    )
    return {  # null: the synchronous median not above zero (noise larger than the stall)
        "persist_stall_agents_vs_sync": med["agents"] / med["sync"] if med["sync"] > 0 else None,
        "persist_blocked_agents_vs_sync": med_blocked["agents"] / med_blocked["sync"],
    }


if __name__ == "__main__":
    main()

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
Ratios: ours / peer (stall), memory / disk (recovery), parity / memcpy (throughput). The last
line is JSON.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.code_start = code_version(SUBDIRS)
    params, rounds = (16 * 2**20, 10) if args.quick else (48 * 2**20, 12)
    start = time.time()

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

    result = {
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
    print_result(result, args, start, "bench_checkpoint.py", SUBDIRS)


if __name__ == "__main__":
    main()

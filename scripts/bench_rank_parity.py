"""Parity across ranks (checkpoint/rank_parity.py) against memcpy, on N local gloo ranks: the
encode exchange (all_to_all of stripes + coding on the parity holder) and the rebuild of rank 1's
image after it lost image and parity, each per rank in MB/s of that rank's image, vs ``copy_`` of
the image in the same process. Medians over ``--repeats``; one intra-op thread per rank.

    python scripts/bench_rank_parity.py                        # xor over 3 ranks, 64 MiB each
    python scripts/bench_rank_parity.py --ec rs:2+1 --mib 64

The last line is JSON (medians over the ranks of each rank's median).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: Path, ec: str, mib: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from longtrain.checkpoint.parity import ErasureCode
    from longtrain.checkpoint.rank_parity import RankParity, exchange_parity, exchange_rebuild

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")
    layout = RankParity.build(ErasureCode.parse(ec), world)
    assert layout is not None
    g = torch.Generator().manual_seed(rank)
    image = torch.randint(0, 256, (mib << 20,), dtype=torch.uint8, generator=g)
    times: dict[str, list[float]] = {"encode": [], "rebuild": [], "memcpy": []}
    have = [r != 1 for r in range(world)]
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        got = exchange_parity(layout, rank, image, group)
        times["encode"].append(time.perf_counter() - t)
        assert got is not None
        parity, lengths, size = got
        dist.barrier()
        t = time.perf_counter()
        torch.empty_like(image).copy_(image)
        times["memcpy"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        mine = have[rank]
        rebuilt = exchange_rebuild(
            layout, rank, have, have, image if mine else None, parity if mine else None, lengths, size, group
        )
        times["rebuild"].append(time.perf_counter() - t)
        assert mine or (rebuilt is not None and torch.equal(rebuilt, image))
    mb = image.numel() / 1e6
    result = {k: mb / statistics.median(v) for k, v in times.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ec", default="xor")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.ec, args.mib, args.repeats)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "WORLD_SIZE": str(args.ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, __file__, "--worker", tmp, "--ec", args.ec, "--mib", str(args.mib)]
        cmd += ["--repeats", str(args.repeats)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in range(args.ranks)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("bench_rank_parity: a rank failed")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    mbps = {k: statistics.median(r[k] for r in ranks) for k in ("encode", "rebuild", "memcpy")}
    print(
        f"{args.ec} over {args.ranks} ranks, {args.mib} MiB each: encode {mbps['encode']:.0f} MB/s, "
        f"rebuild of one rank {mbps['rebuild']:.0f} MB/s, memcpy {mbps['memcpy']:.0f} MB/s"
    )
    print(
        json.dumps(
            {
                "ec": args.ec,
                "ranks": args.ranks,
                "mib": args.mib,
                "mbps": mbps,
                "encode_vs_memcpy": mbps["encode"] / mbps["memcpy"],
                "rebuild_vs_memcpy": mbps["rebuild"] / mbps["memcpy"],
            }
        )
    )


if __name__ == "__main__":
    main()

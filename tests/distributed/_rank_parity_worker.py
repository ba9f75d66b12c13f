"""One rank of test_rank_parity.py (RANK, WORLD_SIZE, MASTER_* set; argv: out_dir, ec, lost ranks
as a comma list). Every rank makes an image of its own length (a seeded random one, as a rank's
snapshot), runs ``exchange_parity`` from a background thread over a separate gloo group while the
main thread runs an all_reduce on the world group (as a training step does), then the ranks in
``lost`` drop their image and parity and ``exchange_rebuild`` gives them back. The result is
compared with the one-process reference (``RankParity.encode_images``). Last, an exchange where
the last rank has no image gives no rank parity."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.checkpoint import rank_parity
from longtrain.checkpoint.parity import ErasureCode
from longtrain.checkpoint.rank_parity import RankParity, exchange_parity, exchange_rebuild

rank_parity.CHUNK = 1024  # stripes of ~2 KB go in two pieces, the second a partial one


def image_of(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, 256, (3000 + 517 * rank,), dtype=torch.uint8, generator=g)


def main() -> None:
    out_dir, ec, lost_arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")
    layout = RankParity.build(ErasureCode.parse(ec), world)
    assert layout is not None
    images = [image_of(r) for r in range(world)]
    size_ref, parity_ref = layout.encode_images(images)

    got: list = []
    thread = threading.Thread(target=lambda: got.append(exchange_parity(layout, rank, images[rank], group)))
    thread.start()
    total = torch.ones(1)
    dist.all_reduce(total)  # the training's own collective, on the world group meanwhile
    thread.join()
    parity, lengths, size = got[0]
    encoded = size == size_ref and parity.keys() == parity_ref[rank].keys()
    encoded = encoded and all(torch.equal(parity[g], parity_ref[rank][g]) for g in parity)

    lost = {int(r) for r in lost_arg.split(",")}
    have = [r not in lost for r in range(world)]
    mine = rank not in lost
    rebuilt = exchange_rebuild(
        layout,
        rank,
        have,
        have,
        images[rank] if mine else None,
        parity if mine else None,
        lengths,
        size,
        group,
    )
    # a rank with no snapshot of a step (its write failed, it has no agent): nobody gets parity
    nobody = exchange_parity(layout, rank, None if rank == world - 1 else images[rank], group)
    result = {
        "none_without_an_image": nobody is None,
        "encoded": bool(encoded) and lengths == [i.numel() for i in images] and total.item() == world,
        "rebuilt": None if rebuilt is None else bool(torch.equal(rebuilt, images[rank])),
        "parity_bytes": sum(p.numel() for p in parity.values()),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

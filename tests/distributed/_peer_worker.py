"""One rank of test_bench_parallel_peer.py (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; argv:
out_dir): bench_parallel's peer (DeepSpeed's Ulysses for HF models on gloo) against the plain HF
model in one process on the whole document, float64: loss sum and gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_parallel  # noqa: E402

LENGTH = 256  # a multiple of the 4 ranks

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ids = torch.randint(0, 4096, (1, LENGTH), generator=torch.Generator().manual_seed(1))  # [1, L]
oracle = bench_parallel.build_peer(LENGTH, 1, 4096).double()  # world 1: the plain HF attention
loss_ref = bench_parallel.peer_loss_sum(oracle, ids, 0, 1)
loss_ref.backward()
peer = bench_parallel.build_peer(LENGTH, world, 4096).double()
loss = bench_parallel.peer_loss_sum(peer, ids, rank, world)
loss.backward()
total = loss.detach().clone()
dist.all_reduce(total)
grad_diff = 0.0
for p, q in zip(peer.parameters(), oracle.parameters(), strict=True):
    g = p.grad.clone()
    dist.all_reduce(g)  # gradients of the rank's loss part, summed over ranks
    grad_diff = max(grad_diff, float((g - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)))
result = {"loss": float(total), "loss_ref": float(loss_ref), "grad_rel": grad_diff}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()

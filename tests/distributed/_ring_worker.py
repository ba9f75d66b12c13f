"""One rank of test_ring.py (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; argv: out_dir).

Every rank builds the same global batch (packed documents of uneven lengths, GQA) and computes
the oracle with the single-process ``attention()`` on the whole stream; then runs the parallel
core on its local rows and records the largest differences of out, lse and q/k/v gradients on
its rows into rank<R>.json. World 2: a ring of 2 and Ulysses over 2. World 4: a ring of 4, a
ring of 3 on ranks {1, 2, 3} beside a ring of 1 on rank 0, two rings of 2 at once ({0, 3} and
{2, 1}), a short document that leaves whole ranks with padding only, and Ulysses over 4.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.parallel.ring import RingAttention, ring_attention
from longtrain.parallel.ulysses import ContiguousLayout, UlyssesAttention, ulysses_attention
from longtrain.parallel.zigzag import ZigzagLayout
from longtrain.trainer.model.attention import DocSpans, ReferenceAttention, attention


def _batch(lengths, n_heads, n_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v, dout = (
        torch.randn(t, h, d, generator=g, dtype=torch.float64).to(dtype)
        for h in (n_heads, n_kv, n_kv, n_heads)
    )
    cu = [0]
    for s in lengths:
        cu.append(cu[-1] + s)
    return q, k, v, dout, DocSpans(tuple(cu))


def _oracle(q, k, v, dout, docs):
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention(*qkv, docs, ReferenceAttention())
    out.backward(dout)
    return out.detach(), lse.detach(), [x.grad for x in qkv]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare(layout, pos, local, oracle, finite_out):
    """Max errors of the local results against the oracle's rows (padding rows: zeros / -inf)."""
    (out, lse, grads), (o_out, o_lse, o_grads) = local, oracle
    valid = layout.valid(pos)
    res = {
        "out": _err(out, layout.shard(o_out, pos)),
        "lse": _err(lse[:, valid], layout.shard(o_lse, pos, dim=1)[:, valid]),
        "pad_lse_is_neg_inf": bool(torch.all(lse[:, ~valid] == float("-inf"))),
        "finite": bool(finite_out and all(torch.isfinite(x).all() for x in (out, *grads))),
        "rows": int(valid.sum()),
    }
    for name, gl, go in zip(("dq", "dk", "dv"), grads, o_grads, strict=True):
        res[name] = _err(gl, layout.shard(go, pos))
    res["scale"] = max(o_out.abs().max().item(), *(g.abs().max().item() for g in o_grads))
    return res


def run_ring(ranks, lengths, dtype, kernel, seed=0, n_heads=4, n_kv=2, d=8):
    rank = dist.get_rank()
    q, k, v, dout, docs = _batch(lengths, n_heads, n_kv, d, dtype, seed)
    oracle = _oracle(q, k, v, dout, docs)
    layout = ZigzagLayout.build(docs, len(ranks))
    pos = ranks.index(rank)
    core = RingAttention(ranks, layout, kernel)
    ql, kl, vl = (layout.shard(x, pos).requires_grad_() for x in (q, k, v))
    dl = layout.shard(dout, pos)
    dl[~layout.valid(pos)] = 1.0  # upstream gradient on padding rows must be ignored
    out, lse = ring_attention(ql, kl, vl, core, 1.0 / math.sqrt(d))
    out.backward(dl)
    finite = bool(torch.isfinite(out).all())
    return _compare(layout, pos, (out.detach(), lse, [x.grad for x in (ql, kl, vl)]), oracle, finite)


def run_ulysses(lengths, dtype, n_heads, n_kv, d=8, seed=0, group=None):
    p, pos = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout, docs = _batch(lengths, n_heads, n_kv, d, dtype, seed)
    oracle = _oracle(q, k, v, dout, docs)
    layout = ContiguousLayout(docs.cu_seqlens, p)
    core = UlyssesAttention(layout, "cpu_flash", group=group)
    ql, kl, vl = (layout.shard(x, pos).requires_grad_() for x in (q, k, v))
    out, lse = ulysses_attention(ql, kl, vl, core, 1.0 / math.sqrt(d))
    out.backward(layout.shard(dout, pos))
    finite = bool(torch.isfinite(out).all())
    return _compare(layout, pos, (out.detach(), lse, [x.grad for x in (ql, kl, vl)]), oracle, finite)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    uneven = [37, 5, 64, 3, 21]  # packed documents, none divisible by 2N
    res: dict[str, dict] = {}
    f64, f32 = torch.float64, torch.float32
    if world == 2:
        for kernel in ("cpu_flash", "math"):
            res[f"ring2_{kernel}_f64"] = run_ring([0, 1], uneven, f64, kernel)
        res["ring2_cpu_flash_f32"] = run_ring([0, 1], uneven, f32, "cpu_flash")
        res["ring2_reversed_f64"] = run_ring([1, 0], uneven, f64, "cpu_flash", seed=1)
        res["ulysses2_f64"] = run_ulysses(uneven, f64, 4, 2)
        res["ulysses2_f32"] = run_ulysses(uneven, f32, 4, 2)
    else:
        for kernel in ("cpu_flash", "math"):
            res[f"ring4_{kernel}_f64"] = run_ring([0, 1, 2, 3], uneven, f64, kernel)
        res["ring4_cpu_flash_f32"] = run_ring([0, 1, 2, 3], uneven, f32, "cpu_flash")
        res["ring4_mha_f64"] = run_ring([3, 1, 0, 2], [50, 29], f64, "cpu_flash", n_kv=4)
        # a ring of 3 inside the world of 4 (no process group), rank 0 on a ring of its own
        if rank == 0:
            res["ring1_f64"] = run_ring([0], [19, 8], f64, "cpu_flash", seed=2)
        else:
            res["ring3_subset_f64"] = run_ring([1, 2, 3], uneven, f64, "cpu_flash", seed=3)
            res["ring3_subset_f32"] = run_ring([1, 2, 3], uneven, f32, "cpu_flash", seed=3)
        # two rings at once
        pair = [0, 3] if rank in (0, 3) else [2, 1]
        res["ring2_pairs_f64"] = run_ring(pair, [40 + pair[0], 9], f64, "cpu_flash", seed=4 + len(pair))
        # a document of 2 tokens over 4 ranks: ranks at positions 2, 3 hold only padding
        res["ring4_tiny_f64"] = run_ring([0, 1, 2, 3], [2], f64, "cpu_flash", seed=5)
        res["ulysses4_f64"] = run_ulysses(uneven, f64, 8, 4)
        res["ulysses4_f32"] = run_ulysses([33, 7, 51], f32, 8, 4)
        # Ulysses inside a group ({0, 1} and {2, 3}, e.g. the mesh's cp axis)
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        res["ulysses2_group_f64"] = run_ulysses([13, 30], f64, 4, 2, seed=6, group=groups[rank // 2])
    dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))

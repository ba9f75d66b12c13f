"""One rank of test_hdp_step.py (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; argv: out_dir).

A tiny float64 decoder stack runs one HDP step without the trainer: every rank plans the same
global batch (plan_hdp: some documents on rings, the rest in packs), runs its jobs in the global
order (a ring job through RingAttention on the zigzag shard, with the shard's RoPE positions and
pre-shifted targets; a pack through the model's own core), scales each loss sum by the global
token count and sums gradients over the world. The oracle is one process on the whole batch.
Runs with the plain executor and with the token-wise executor (out/lse offloaded whole), then
with model states sharded by FSDP2 over all ranks (``parallel.shard=fsdp``): the step's jobs as
lock-step rounds (``build_rounds``; padding micro-batches where a rank has no job) through the
trainer's shards (``hdp_work``) and its gradient sync (reduce-scatter in the last round only);
the oracle is compared with the full (gathered) gradients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from longtrain.offload import apply_activation_memory
from longtrain.parallel import ParallelConfig, apply_sharding, init_mesh
from longtrain.parallel.hdp import CostModel, check_plan, plan_hdp
from longtrain.parallel.hdp_rounds import build_rounds, check_rounds
from longtrain.parallel.ring import RingAttention
from longtrain.parallel.shards import DocStream
from longtrain.parallel.zigzag import ZigzagLayout
from longtrain.trainer.batches import hdp_work
from longtrain.trainer.model.adapter import IGNORE_INDEX, adapt, shift_labels
from longtrain.trainer.model.attention import DocSpans
from longtrain.trainer.model.hf import build_hf_model
from longtrain.trainer.model.loss_triton import fused_linear_cross_entropy

CFG = SimpleNamespace(
    family="qwen2",
    path=None,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    head_dim=None,
    vocab_size=97,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    sliding_window=None,
    init_std=0.1,
)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _job_rows(job, cu: list[int], rank: int):
    """(global rows or -1, positions, DocSpans, backend or None) of this rank's part of a job."""
    starts = [cu[d] for d in job.docs]
    lengths = [cu[d + 1] - cu[d] for d in job.docs]
    job_cu = [0]
    for s in lengths:
        job_cu.append(job_cu[-1] + s)
    stream = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, lengths, strict=True)])
    if job.layout == "pack":
        pos = torch.cat([torch.arange(n) for n in lengths])
        return stream, pos, DocSpans(tuple(job_cu)), None
    layout = ZigzagLayout(tuple(job_cu), len(job.ranks))
    p = job.ranks.index(rank)
    idx = layout.global_index(p)
    rows = torch.where(idx >= 0, stream[idx.clamp(min=0)], -1)
    return rows, layout.positions(p), layout.local_docs, RingAttention(job.ranks, layout, "cpu_flash")


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = adapt(build_hf_model(CFG, vocab_size=97, seq_len=128, dtype=torch.float64), "cpu_flash")
    core = model.attention_backend

    lengths = [45, 7, 12, 30, 5, 9, 3, 14, 2]  # capacity 16: 45 and 30 need rings
    cu = [0]
    for s in lengths:
        cu.append(cu[-1] + s)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (cu[-1],), generator=g)
    labels = ids.clone()
    labels[torch.tensor(cu[:-1])] = IGNORE_INDEX  # no target across a document boundary
    pos = torch.cat([torch.arange(s) for s in lengths])
    targets = shift_labels(labels[None])[0]
    global_count = int((targets != IGNORE_INDEX).sum())

    out = model(input_ids=ids[None], labels=labels[None], position_ids=pos[None])
    out.loss.backward()
    oracle_loss, oracle = out.loss.item(), _grads(model)

    cost = CostModel(attn=1e-6, linear=1e-3, fixed=0.05, comm=2e-4)
    plan = plan_hdp(lengths, world, 16, cost)
    check_plan(plan)
    result: dict = {"rank": rank, "jobs": [[j.layout, list(j.ranks)] for j in plan.rank_jobs(rank)]}
    for mode in ("none", "tokenwise"):
        apply_activation_memory(
            model, {"mode": mode, "alpha": 0.5, "keep_last": 0} if mode != "none" else None
        )
        model.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for job in plan.rank_jobs(rank):
            rows, positions, docs, ring = _job_rows(job, cu, rank)
            valid = rows >= 0
            ids_l = torch.where(valid, ids[rows.clamp(min=0)], 0)
            tgt_l = torch.where(valid, targets[rows.clamp(min=0)], IGNORE_INDEX)
            model.attention_backend = ring if ring is not None else core
            x, ctx = model.layer_inputs(ids_l[None], positions[None], docs)
            x = model.model.norm(model.layer_executor(model.layer_parts, x, ctx))
            part = fused_linear_cross_entropy(x, model.lm_head.weight, tgt_l, bias_v=model.lm_head.bias)
            (part / global_count).backward()
            loss_sum += part.detach()
        model.attention_backend = core
        local = _grads(model)
        for n in oracle:
            grad = local.get(n, torch.zeros_like(oracle[n]))
            dist.all_reduce(grad)
            local[n] = grad
        dist.all_reduce(loss_sum)
        result[mode] = {
            "loss_diff": abs(loss_sum.item() / global_count - oracle_loss),
            "max_grad_diff": max((local[n] - oracle[n]).abs().max().item() for n in oracle),
            "max_grad": max(v.abs().max().item() for v in oracle.values()),
            "stats": {k: float(v) for k, v in model.layer_executor_stats().items()},
        }
    result["fsdp"] = _fsdp_rounds(model, plan, cost, ids, labels, cu, global_count, oracle_loss, oracle)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _fsdp_rounds(model, plan, cost, ids, labels, cu, global_count, oracle_loss, oracle) -> dict:
    """The step with FSDP2 over all ranks, as the trainer runs it (train.py ``train_step``)."""
    model.zero_grad(set_to_none=True)
    mesh = init_mesh(ParallelConfig(mode="hdp", shard="fsdp"), "cpu")
    sharding = apply_sharding(ParallelConfig(mode="hdp", shard="fsdp"), model, mesh)
    assert sharding.sharded
    stream = DocStream.from_rows(ids[None], labels[None], DocSpans(tuple(cu)))
    assert stream.num_loss_tokens == global_count
    rounds = build_rounds(plan, cost)
    check_rounds(plan, rounds)
    work = hdp_work(plan, stream, mesh.rank, "cpu_flash", rounds)
    assert len(work) == len(rounds.rounds)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, w in enumerate(work):
        sh = w.shard
        out = model(
            input_ids=sh.input_ids,
            targets=sh.targets,
            position_ids=sh.position_ids,
            doc_spans=sh.doc_spans,
            attention=sh.attention,
            loss_normalizer=global_count,
        )
        sharding.grad_sync.before_backward(i == len(work) - 1)
        sharding.grad_sync.backward(out.loss)
        loss_sum += out.loss_sum.detach()
    sharding.grad_sync.after_backward()
    params = dict(model.named_parameters())
    full = {n: params[n].grad.full_tensor() for n in oracle}  # collective, same order on every rank
    dist.all_reduce(loss_sum)
    return {
        "loss_diff": abs(loss_sum.item() / global_count - oracle_loss),
        "max_grad_diff": max((full[n] - oracle[n]).abs().max().item() for n in oracle),
        "max_grad": max(v.abs().max().item() for v in oracle.values()),
        "stats": {k: float(v) for k, v in model.layer_executor_stats().items()},
        "rounds": [[None if j is None else j.layout for j in row] for row in rounds.rounds],
        "empty": rounds.empty_per_rank[mesh.rank],
        "sharded": all(type(p).__name__ == "DTensor" for p in params.values()),
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]))

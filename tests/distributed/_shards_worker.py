"""One rank of test_cp_trainer.py's shard test (RANK, WORLD_SIZE=2, MASTER_* set; argv: out_dir).

A tiny float64 model runs ring and Ulysses shards (parallel/shards.py) of a document stream through
``CausalLM.forward(targets=..., attention=...)`` with the token-wise executor; loss sums and
gradients summed over the 2 ranks must equal one process on the whole stream (``pack_shard``).
Streams: mixed documents (uneven, not divisible by the ring), and one document of a single token
with a target, which leaves rank 1 nothing but padding (its loss must be 0, never NaN).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.offload import apply_activation_memory
from longtrain.parallel.shards import DocStream, pack_shard, ring_shard, ulysses_shard
from longtrain.trainer.model.adapter import adapt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_hf_model  # noqa: E402


def _stream(lengths: list[int], seed: int) -> DocStream:
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    ids = torch.randint(0, 97, (cu[-1],), generator=g)
    targets = torch.randint(0, 97, (cu[-1],), generator=g)
    return DocStream(ids, targets, tuple(cu))


def _run(model, shard, normalizer: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(
        input_ids=shard.input_ids,
        targets=shard.targets,
        position_ids=shard.position_ids,
        doc_spans=shard.doc_spans,
        attention=shard.attention,
        loss_normalizer=normalizer,
    )
    out.loss.backward()
    grads = {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
    }
    return out.loss_sum.item(), grads


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = adapt(tiny_hf_model("llama"), "cpu_flash")
    apply_activation_memory(model, {"mode": "tokenwise", "alpha": 0.5, "keep_last": 0, "tile_rows": 8})
    streams = {"mixed": _stream([13, 2, 30, 7], 1), "one_token": _stream([1], 2)}
    result: dict = {}
    for name, stream in streams.items():
        count = max(stream.num_loss_tokens, 1)
        oracle_loss, oracle = _run(model, pack_shard(stream), count)
        for impl in ("ring", "ulysses"):
            if impl == "ring":
                shard = ring_shard(stream, list(range(world)), rank, "cpu_flash")
            else:
                shard = ulysses_shard(stream, None, rank, world, model.attention_backend)
            loss, grads = _run(model, shard, count)
            finite = all(bool(torch.isfinite(g).all()) for g in grads.values()) and loss == loss
            padding_only = shard.num_rows > 0 and bool((shard.targets < 0).all())
            total = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(total)
            for g in grads.values():
                dist.all_reduce(g)
            result[f"{name}/{impl}"] = {
                "finite": finite,
                "local_loss": loss,
                "padding_only": padding_only,
                "loss_diff": abs(total.item() - oracle_loss),
                "grad_diff": max((grads[n] - oracle[n]).abs().max().item() for n in oracle),
                "grad_scale": max(g.abs().max().item() for g in oracle.values()),
            }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""One rank of test_fsdp.test_fsdp_equals_one_process (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
set; argv: output directory, JSON of the optimizer config, JSON of the activation config).

Every rank builds the same tiny float64 model twice: an oracle that one process trains on the
whole global batch (4 rows) and a copy sharded with FSDP2 (``apply_sharding``) that trains on this
rank's rows, with the global token count as loss normaliser; both with the same activation
config and optimizer container (clipping on). After 3 steps the sharded parameters, gathered, must
equal the oracle's; each rank also reports its local optimizer-state bytes and the executor's host
bytes (tensors the executor offloaded: parameters must never be among them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from longtrain.offload import activation_stats, apply_activation_memory
from longtrain.optim import build_optimizer
from longtrain.optim.config import OptimConfig
from longtrain.parallel import ParallelConfig, apply_sharding, init_mesh, shutdown

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_adapted_model  # noqa: E402

ROWS, SEQ, VOCAB, STEPS = 4, 48, 101, 3


def state_bytes(stats: dict) -> int:
    """Optimizer-state bytes over the tiers (``optim_{tier}_bytes``)."""
    return sum(int(v) for k, v in stats.items() if k.startswith("optim_") and k.endswith("_bytes"))


def main(out_dir: Path, optim_cfg: dict, activation: dict) -> None:
    torch.set_num_threads(1)
    mesh = init_mesh(ParallelConfig(shard="fsdp"), "cpu")
    world, rank = mesh.world_size, mesh.rank
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    total = ROWS * (SEQ - 1)
    ocfg = OptimConfig(**optim_cfg)

    def build():
        model = tiny_adapted_model("llama", torch.float64, layers=3, vocab=VOCAB)
        return apply_activation_memory(model, activation)

    oracle = build()
    initial = {name: p.detach().clone() for name, p in oracle.named_parameters()}
    oracle_opt = build_optimizer(oracle, ocfg, overlap_backward=False)
    model = build()
    sharding = apply_sharding(ParallelConfig(shard="fsdp"), model, mesh)
    opt = build_optimizer(model, ocfg, overlap_backward=False, shards=sharding.shards)
    rows = ids[rank * ROWS // world : (rank + 1) * ROWS // world]
    norms = []
    for _ in range(STEPS):
        oracle(input_ids=ids, labels=ids).loss.backward()
        oracle_norm = oracle_opt.clip_and_step()
        sharding.grad_sync.before_backward(True)
        model(input_ids=rows, labels=rows, loss_normalizer=total).loss.backward()
        sharding.grad_sync.after_backward()
        norms.append((oracle_norm, opt.clip_and_step()))
    host_bytes = activation_stats(model).get("host_bytes", 0)
    oracle_params = dict(oracle.named_parameters())
    worst, moved = 0.0, 0.0
    for name, p in model.named_parameters():
        full = p.full_tensor()  # type: ignore[attr-defined]
        ref = oracle_params[name]
        worst = max(worst, ((full - ref).abs().max() / ref.abs().max()).item())
        moved = max(moved, (ref - initial[name]).abs().max().item())
    stats = opt.stats()
    result = {
        "rank": rank,
        "worst_rel": worst,
        "moved": moved,
        "norms": norms,
        "optim_bytes": state_bytes(stats),
        "oracle_optim_bytes": state_bytes(oracle_opt.stats()),
        "host_bytes": host_bytes,
        "rows": int(rows.shape[0]),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    opt.close()
    oracle_opt.close()
    shutdown(mesh)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]))

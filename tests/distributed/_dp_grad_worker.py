"""One rank of test_data_parallel.test_dp_gradients_equal_single_process (started with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; writes rank<R>.json into the directory in argv[1]).

Every rank builds the same tiny float64 model and the same global batch of 4 rows whose rows
carry different numbers of loss tokens. The oracle is one process over all 4 rows, computed
locally on each rank; then rank r runs rows 2r, 2r+1 with the global token count as the loss
normaliser and ``sync_gradients`` sums the gradients over the two ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from longtrain.parallel import ParallelConfig, all_reduce_sum, init_mesh, shutdown, sync_gradients
from longtrain.trainer.model.adapter import IGNORE_INDEX, adapt
from longtrain.trainer.model.hf import build_hf_model


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    assert p.grad is not None  # every parameter takes part in the loss
    return p.grad


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    mesh = init_mesh(ParallelConfig(), "cpu")
    assert mesh.world_size == 2 and mesh.dp_size == 2 and mesh.distributed

    # a ModelConfig-like namespace (trainer.config would import the data pipeline: slower start-up)
    cfg = SimpleNamespace(
        family="qwen2",
        path=None,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        head_dim=None,
        vocab_size=97,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        sliding_window=None,
        init_std=0.1,
    )
    torch.manual_seed(0)
    model = adapt(build_hf_model(cfg, vocab_size=97, seq_len=64, dtype=torch.float64), "cpu_flash")

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 24), generator=g)  # the global batch [4, 24]
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX  # rank 0: 13 + 23 loss tokens; rank 1: 23 + 4
    labels[3, 5:] = IGNORE_INDEX
    position_ids = torch.arange(24).repeat(4, 1)
    position_ids[1, 9:] = torch.arange(15)  # a packed row: two documents
    labels[1, 9] = IGNORE_INDEX
    global_count = int((labels[:, 1:] != IGNORE_INDEX).sum())

    # oracle: one process, all rows
    model(input_ids=ids, labels=labels, position_ids=position_ids).loss.backward()
    oracle = {n: _grad(p).clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    rows = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
    local_labels = labels[rows]
    local_count = int((local_labels[:, 1:] != IGNORE_INDEX).sum())
    assert all_reduce_sum(local_count, mesh) == global_count
    out = model(
        input_ids=ids[rows],
        labels=local_labels,
        position_ids=position_ids[rows],
        loss_normalizer=global_count,
    )
    out.loss.backward()
    local = {n: _grad(p).clone() for n, p in model.named_parameters()}
    sync_gradients(model, mesh)
    synced = {n: _grad(p) for n, p in model.named_parameters()}

    result = {
        "rank": mesh.rank,
        "local_count": local_count,
        "global_count": global_count,
        "max_abs_diff": max((synced[n] - oracle[n]).abs().max().item() for n in oracle),
        "max_abs_oracle": max(g.abs().max().item() for g in oracle.values()),
        # guard: before the sync a rank's gradient is far from the global one
        "local_max_abs_diff": max((local[n] - oracle[n]).abs().max().item() for n in oracle),
        "loss_sum": all_reduce_sum(out.loss_sum.item(), mesh) / global_count,
    }
    with torch.no_grad():
        result["oracle_loss"] = model(input_ids=ids, labels=labels, position_ids=position_ids).loss.item()
    (out_dir / f"rank{mesh.rank}.json").write_text(json.dumps(result))
    shutdown(mesh)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

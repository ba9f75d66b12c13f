"""What each rank runs per step under parallel.mode=cp/hdp (trainer/batches.py, parallel/shards.py),
without processes: streams, the hdp global batch cut over ranks, checks before the first step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longtrain.offload import apply_activation_memory
from longtrain.parallel import Mesh
from longtrain.parallel.hdp import DEFAULT_COST, plan_hdp
from longtrain.parallel.shards import DocStream, pack_shard, ring_shard
from longtrain.trainer.batches import StepBatches, check_layout, hdp_rows_per_step
from longtrain.trainer.compose import compose
from longtrain.trainer.config import ConfigError
from longtrain.trainer.data import IGNORE_INDEX, PackedLoader, build_datasets, pack_documents
from longtrain.trainer.model.attention import DocSpans


def _mesh(rank: int, world: int, cp: int = 1) -> Mesh:
    return Mesh(rank, world, rank // cp, world // cp, torch.device("cpu"), None, rank % cp, cp)


def _model(heads: int = 4, kv_heads: int = 2):
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
    return SimpleNamespace(config=config, attention_backend=None)


def test_stream_shifts_targets_on_the_whole_stream_and_drops_documents_without_targets():
    rows = pack_documents([[5, 6, 7], [8, 9], [4]], seq_len=8, pad_id=0, seed=None)
    stream = DocStream.from_rows(
        rows.input_ids.long(), rows.labels.long(), DocSpans.from_position_ids(rows.position_ids)
    )
    assert stream.lengths == [3, 2]  # the one-token document and the padding run hold no target
    assert stream.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert stream.targets.tolist() == [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]
    # a zigzag shard keeps each row's own target (not its neighbour's in the shard)
    shard = ring_shard(stream, (0, 1), 1)
    for tok, tgt in zip(shard.input_ids[0].tolist(), shard.targets[0].tolist(), strict=True):
        if tgt != IGNORE_INDEX:
            i = stream.input_ids.tolist().index(tok)
            assert stream.targets[i] == tgt
    assert pack_shard(stream).position_ids[0].tolist() == [0, 1, 2, 0, 1]


def test_hdp_ranks_together_run_the_documents_of_one_process():
    """On 3 and 4 ranks with rings (capacity 64 < 128-token documents) the ranks' targets together
    are those of one process (capacity 128), and every rank knows the global token count."""
    common = ["parallel.mode=hdp", "train.seq_len=128", "data.max_documents=200"]
    cfg = compose("tiny_cpu", [*common, "parallel.token_capacity=64"])
    one_cfg = compose("tiny_cpu", [*common, "parallel.token_capacity=128"])
    data = build_datasets(cfg.data, seq_len=cfg.train.seq_len, seed=cfg.seed)

    def tokens_of(world: int, cfg=cfg) -> tuple[list[int], int]:
        tokens, counts, rings = [], set(), 0
        for rank in range(world):
            loader = PackedLoader(data.train, hdp_rows_per_step(cfg), seed=cfg.seed)
            step = next(StepBatches(cfg, _mesh(rank, world), loader, _model()))  # type: ignore[arg-type]
            counts.add(step.num_tokens)
            for work in step.work:
                rings += work.share < 1
                keep = work.shard.targets[0] != IGNORE_INDEX
                tokens += work.shard.targets[0][keep].tolist()
        assert len(counts) == 1, "every rank knows the same global token count"
        assert rings > 0 or world == 1, "guard: some documents run on rings"
        count = counts.pop()
        assert count is not None, "hdp knows the global count without a collective"
        return sorted(tokens), count

    one, count = tokens_of(1, one_cfg)
    assert len(one) == count > 0
    assert tokens_of(4) == (one, count)
    assert tokens_of(3) == (one, count)


def test_hdp_balance_switch_reaches_the_planner():
    """parallel.hdp_balance picks the balanced or the naive plan; both cover the same documents."""
    common = [
        "parallel.mode=hdp",
        "train.seq_len=128",
        "data.max_documents=200",
        "parallel.token_capacity=64",
    ]
    data = None
    plans = {}
    for balance in ("true", "false"):
        cfg = compose("tiny_cpu", [*common, f"parallel.hdp_balance={balance}"])
        data = data or build_datasets(cfg.data, seq_len=cfg.train.seq_len, seed=cfg.seed)
        batches = StepBatches(cfg, _mesh(0, 4), PackedLoader(data.train, hdp_rows_per_step(cfg)), _model())  # type: ignore[arg-type]
        next(batches)
        assert batches.last_plan is not None
        plans[balance] = batches.last_plan
    expect = plan_hdp(plans["true"].lengths, 4, 64, DEFAULT_COST, balance=False)
    assert [j.docs for j in plans["false"].jobs] == [j.docs for j in expect.jobs]
    assert [j.docs for j in plans["true"].jobs] != [j.docs for j in expect.jobs]
    assert plans["true"].makespan < plans["false"].makespan


@pytest.mark.parametrize(
    ("overrides", "mesh", "expected"),
    [
        (
            ["parallel.mode=cp", "parallel.context_parallel=4", "parallel.cp_impl=ulysses"],
            _mesh(0, 4, cp=4),
            "parallel.cp_impl=ulysses needs the context-parallel degree (4) to divide the model's num_kv_heads (2)",
        ),
        (
            ["parallel.mode=hdp", "parallel.token_capacity=64"],
            _mesh(0, 2),
            "a document of 512 tokens does not fit 2 ranks x 64 tokens; raise parallel.token_capacity",
        ),
    ],
)
def test_bad_layout_is_one_line_naming_the_key_before_the_first_step(overrides, mesh, expected):
    with pytest.raises(ConfigError) as info:
        check_layout(compose("tiny_cpu", overrides), mesh, _model())  # type: ignore[arg-type]
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cp_fsdp_over_several_groups_rejects_the_alpha_probe(make_tiny_model):
    model = apply_activation_memory(
        make_tiny_model("llama"), {"mode": "tokenwise", "alpha": "auto", "keep_last": 0}
    )
    cfg = compose("tiny_cpu", ["parallel.mode=cp", "parallel.context_parallel=2", "parallel.shard=fsdp"])
    check_layout(cfg, _mesh(0, 2, cp=2), model)  # one cp group: every rank sees the same rows
    with pytest.raises(ConfigError, match="set activation.alpha to a number"):
        check_layout(cfg, _mesh(0, 4, cp=2), model)
    apply_activation_memory(model, {"mode": "tokenwise", "alpha": 0.5})
    check_layout(cfg, _mesh(0, 4, cp=2), model)


def test_hdp_global_batch_larger_than_the_data_is_one_line():
    from longtrain.trainer.train import build_data

    cfg = compose(
        "tiny_cpu", ["parallel.mode=hdp", "data.max_documents=20", "train.global_batch_tokens=65536"]
    )
    with pytest.raises(ConfigError, match=r"fewer than the 128 of one step \(train.global_batch_tokens"):
        build_data(cfg, _mesh(0, 1))


def test_hdp_cost_is_profiled_once_per_job_and_read_back(tmp_path, monkeypatch):
    """parallel.hdp_cost=profile times this model on five packs, fits attention ~ s^2, rows ~ s and a
    per-micro-batch constant, and keeps the fit in output_dir; a re-run of the job reads it back
    (no timing), a changed capacity profiles again, and the fit recovers known coefficients."""
    from tiny import tiny_adapted_model

    from longtrain.parallel.cost_model import CostModel, profile_packs
    from longtrain.trainer import batches

    common = ["parallel.mode=hdp", "train.seq_len=128", f"output_dir={tmp_path}"]
    cfg = compose("tiny_cpu", common)
    model = tiny_adapted_model("llama", torch.float32, layers=2, vocab=101)
    mesh = _mesh(0, 1)
    cost, source = batches.hdp_cost_model(cfg, mesh, model)  # type: ignore[arg-type]
    assert source == "profiled" and (tmp_path / batches.HDP_COST_FILE).is_file()
    assert min(cost.attn, cost.linear, cost.fixed) >= 0 and cost.attn + cost.linear > 0, cost
    assert all(p.grad is None for p in model.parameters()), "the profile's gradients are dropped"

    def no_timing(*args, **kwargs):
        raise AssertionError("a kept fit must be read back, not profiled again")

    monkeypatch.setattr(batches, "_time_pack", no_timing)
    again, source = batches.hdp_cost_model(cfg, mesh, model)  # type: ignore[arg-type]
    assert again == cost and source == str(tmp_path / batches.HDP_COST_FILE)

    truth = CostModel(attn=3e-9, linear=2e-6, fixed=4e-3)
    monkeypatch.setattr(batches, "_time_pack", lambda cfg, mesh, model, lengths: truth.job_time(lengths))
    other = compose("tiny_cpu", [*common, "parallel.token_capacity=96"])
    fitted, source = batches.hdp_cost_model(other, mesh, model)  # type: ignore[arg-type]
    assert source == "profiled" and len(profile_packs(96)) == 5
    for got, want in ((fitted.attn, truth.attn), (fitted.linear, truth.linear), (fitted.fixed, truth.fixed)):
        assert abs(got - want) <= 1e-6 * want, (fitted, truth)

    default = compose("tiny_cpu", [*common, "parallel.hdp_cost=default"])
    assert batches.hdp_cost_model(default, mesh, model) == (DEFAULT_COST, "default")  # type: ignore[arg-type]


def test_hdp_cost_outside_hdp_names_the_key():
    with pytest.raises(ConfigError, match=r"parallel\.hdp_cost=default applies to parallel\.mode=hdp only"):
        compose("tiny_cpu", ["parallel.hdp_cost=default"])

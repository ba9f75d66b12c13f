"""Lock-step rounds of an HDP plan (parallel.shard=fsdp with parallel.mode=hdp): every document
once, rings whole in one round, one micro-batch per rank and round, deadlock-free, the padding
it costs, and a padding micro-batch that adds exactly nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import tiny_adapted_model

from longtrain.offload import apply_activation_memory
from longtrain.parallel import Mesh
from longtrain.parallel.cost_model import DEFAULT_COST, CostModel
from longtrain.parallel.hdp import HdpPlan, Job, check_plan, plan_hdp
from longtrain.parallel.hdp_rounds import HdpRounds, build_rounds, check_rounds
from longtrain.parallel.shards import padding_shard
from longtrain.parallel.simulate import heavy_tailed_lengths, static_mesh
from longtrain.trainer.batches import check_layout
from longtrain.trainer.compose import compose
from longtrain.trainer.config import ConfigError

SMALL_COST = CostModel(attn=1e-6, linear=1e-3, fixed=0.05, comm=2e-4)


def _batch(seed: int, n_docs: int, capacity: int, n_ranks: int) -> list[int]:
    rng = np.random.default_rng(seed)
    short = rng.integers(1, capacity + 1, n_docs)
    long_: np.ndarray | list[int] = (
        rng.integers(capacity + 1, (capacity - 1) * n_ranks + 1, n_docs // 8) if n_ranks > 1 else []
    )
    return [int(s) for s in np.concatenate([short, long_, [0]])]


def _has_work(rounds: HdpRounds, rank: int) -> int:
    return sum(j is not None for j in rounds.rank_rounds(rank))


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize(
    "seed,n_ranks,capacity", [(0, 4, 64), (1, 8, 100), (2, 3, 33), (3, 16, 257), (4, 1, 50)]
)
def test_rounds_invariants(seed, n_ranks, capacity, balance):
    lengths = _batch(seed, 50, capacity, n_ranks)
    plan = plan_hdp(lengths, n_ranks, capacity, SMALL_COST, balance=balance)
    check_plan(plan)
    rounds = build_rounds(plan, SMALL_COST)
    check_rounds(plan, rounds)  # documents once, rings whole, packs <= C, deadlock-free
    assert all(len(rounds.rank_rounds(k)) == len(rounds.rounds) for k in range(n_ranks))
    # as many rounds as the busiest rank has micro-batches (these plans have no ring cycle)
    assert len(rounds.rounds) == max(_has_work(rounds, k) for k in range(n_ranks))
    slots = sum(len(j.ranks) for row in rounds.rounds for j in set(row) if j is not None)
    assert len(rounds.rounds) >= math.ceil(slots / n_ranks)
    assert sum(rounds.empty_per_rank) == len(rounds.rounds) * n_ranks - slots
    # padding costs nothing in the planned time: the rounds' makespan is the sum of round maxima
    expect = sum(max((j.cost for j in row if j is not None), default=0.0) for row in rounds.rounds)
    assert rounds.makespan == pytest.approx(expect)
    assert build_rounds(plan, SMALL_COST) == rounds, "deterministic: every rank builds the same rounds"


def test_ring_cycle_needs_a_third_round():
    """Rings on ranks {0,1}, {1,2}, {0,2}: two jobs per rank, but pairwise overlapping, so three
    rounds, each with one rank padding."""
    jobs = [Job((d,), ranks, 10, 1.0, 0.0) for d, ranks in enumerate([(0, 1), (1, 2), (0, 2)])]
    plan = HdpPlan(jobs, 3, 16, (20, 20, 20))
    rounds = build_rounds(plan, SMALL_COST)
    check_rounds(plan, rounds)
    assert len(rounds.rounds) == 3 and rounds.empty_per_rank == [1, 1, 1]


def test_a_batch_without_documents_is_one_round_of_padding():
    plan = plan_hdp([0, 0], 3, 16, SMALL_COST)
    rounds = build_rounds(plan, SMALL_COST)
    check_rounds(plan, rounds)
    assert rounds.rounds == [[None, None, None]] and rounds.empty_fraction == 1.0


def test_check_rounds_catches_a_split_ring_and_a_lost_document():
    ring = Job((0,), (0, 1), 10, 1.0, 0.0)
    pack = Job((1,), (1,), 5, 0.5, 0.0)
    plan = HdpPlan([ring, pack], 2, 16, (20, 5))
    check_rounds(plan, HdpRounds([[ring, ring], [None, pack]], 2))
    with pytest.raises(AssertionError, match="different rounds"):
        check_rounds(plan, HdpRounds([[ring, pack], [None, ring]], 2))
    with pytest.raises(AssertionError, match="documents"):
        check_rounds(plan, HdpRounds([[ring, ring]], 2))
    with pytest.raises(AssertionError, match="padding on every rank"):
        check_rounds(plan, HdpRounds([[ring, ring], [None, pack], [None, None]], 2))


def test_padding_at_64_ranks_256k():
    """The simulator's heavy-tailed batch: few padded rank-rounds, and lock-step rounds still beat
    the static mesh clearly and stay near the free-running balanced plan."""
    lengths = heavy_tailed_lengths(1024, 262144, seed=1)
    plan = plan_hdp(lengths, 64, 16384)
    rounds = build_rounds(plan, DEFAULT_COST)
    check_rounds(plan, rounds)
    static = static_mesh(lengths, 64, 16384, 262144, DEFAULT_COST)["makespan"]
    print(
        f"\n64 ranks, 256K: {len(rounds.rounds)} rounds, {rounds.empty_fraction:.3f} of rank-rounds padding, "
        f"rounds {rounds.makespan / plan.makespan:.3f}x the free-running makespan, static {static / rounds.makespan:.2f}x rounds"
    )
    assert rounds.empty_fraction < 0.10
    assert rounds.makespan < 1.5 * plan.makespan
    assert rounds.makespan < 0.7 * static


@pytest.mark.parametrize("activation", [None, {"mode": "tokenwise", "alpha": 0.5, "keep_last": 0}])
def test_padding_micro_batch_adds_exact_zeros(activation):
    """Loss 0 and a zero (not None, never NaN) gradient for every parameter: the padding runs the
    whole model, so FSDP all-gathers and reduce-scatters every unit on a rank without a job."""
    model = apply_activation_memory(
        tiny_adapted_model("llama", torch.float64, layers=2, vocab=101), activation
    )
    shard = padding_shard()
    assert shard.num_loss_tokens == 0
    out = model(
        input_ids=shard.input_ids,
        targets=shard.targets,
        position_ids=shard.position_ids,
        doc_spans=shard.doc_spans,
        loss_normalizer=7,
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.loss_sum.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name


def test_alpha_auto_with_hdp_fsdp_on_several_ranks_is_one_line_naming_the_key():
    """The alpha probe all-gathers a layer when a rank's row count changes: under lock-step rounds
    the ranks' row counts differ, so it would hang; refused before the first step."""

    cfg = compose("tiny_cpu", ["parallel.mode=hdp", "parallel.shard=fsdp", "activation.alpha=auto"])
    model = apply_activation_memory(
        tiny_adapted_model("llama", torch.float64, layers=2, vocab=101), cfg.activation
    )
    two = Mesh(rank=0, world_size=2, dp_rank=0, dp_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="activation.alpha") as err:
        check_layout(cfg, two, model)
    assert "\n" not in str(err.value) and "parallel.shard" in str(err.value)
    one = Mesh(rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    check_layout(cfg, one, model)  # one process: unsharded, nothing to hang
    fixed = compose("tiny_cpu", ["parallel.mode=hdp", "parallel.shard=fsdp", "activation.alpha=0.5"])
    check_layout(fixed, two, apply_activation_memory(model, fixed.activation))

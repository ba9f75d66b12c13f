"""What each rank runs in one optimizer step, per ``parallel.mode``.

    dp   every rank: ``grad_accum`` micro-batches of its own packed rows (targets shifted per row)
    cp   a static dp x cp mesh: a cp group takes one data-parallel rank's micro-batches; each is one
         token stream (targets shifted on it), cut over the group's ranks per document (zigzag
         ring attention) or into contiguous slices (Ulysses, all-to-all over the mesh's cp axis)
    hdp  every rank reads the whole global batch (``train.global_batch_tokens``, independent of the
         number of ranks) and plans it the same way (``plan_hdp``): documents longer than the
         per-rank token capacity on rings of ranks, the rest in packs; a rank runs its jobs in the
         global order (ranks may run different numbers of micro-batches, or none); with
         ``parallel.shard=fsdp`` in lock-step rounds, one micro-batch per rank and round, padding
         where a rank has no job (``parallel/hdp_rounds.py``)

``next_step()`` returns a ``StepWork``: this rank's shards (``parallel/shards.py``) and, where
every rank knows it without a collective, the step's global loss-token count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longtrain.offload.tokenwise import TokenwiseExecutor
from longtrain.parallel import Mesh, all_reduce_sums, broadcast_object
from longtrain.parallel.cost_model import fit_cost_model, profile_packs
from longtrain.parallel.hdp import DEFAULT_COST, CostModel, HdpPlan, plan_hdp, ring_size
from longtrain.parallel.hdp_rounds import HdpRounds, build_rounds
from longtrain.parallel.shards import DocStream, Shard, pack_shard, padding_shard, ring_shard, ulysses_shard
from longtrain.parallel.ulysses import check_ulysses
from longtrain.trainer.data import IGNORE_INDEX, MicroBatch, PackedLoader
from longtrain.trainer.model.adapter import CausalLM, shift_labels

from .config import ConfigError, JobConfig


@dataclass
class Work:
    """One forward/backward of a rank: its shard and the documents it is a ``share`` of (for FLOPs)."""

    shard: Shard
    doc_lengths: tuple[int, ...]  # lengths of the documents (rows) the shard was cut from
    share: float = 1.0  # this rank's part of them (1 / ring size)


@dataclass
class StepWork:
    work: list[Work]
    num_tokens: int | None = None  # global loss tokens when known on every rank (hdp); None = sum them
    stats: dict[str, float] = field(default_factory=dict)  # planned figures (hdp)


def row_work(mb: MicroBatch) -> Work:
    """A data-parallel micro-batch as it is: [b, s] rows, targets shifted inside each row."""
    assert mb.doc_spans is not None  # MicroBatch computes them on construction
    shard = Shard(mb.input_ids, shift_labels(mb.labels), mb.position_ids, mb.doc_spans)
    return Work(shard, tuple(e - s for s, e in mb.doc_spans.spans))


class StepBatches:
    """Iterator of ``StepWork``; ``loader`` is what a checkpoint saves (its position)."""

    def __init__(self, cfg: JobConfig, mesh: Mesh, loader: PackedLoader, model: CausalLM):
        self.cfg, self.mesh, self.loader, self.model = cfg, mesh, loader, model
        self.mode = cfg.parallel.mode
        self.capacity = token_capacity(cfg)
        self.cost: CostModel = DEFAULT_COST
        self.last_plan: HdpPlan | None = None
        # sharded model states: every rank must reach the same per-layer collectives
        self.lock_step = cfg.parallel.shard == "fsdp" and mesh.distributed

    def __iter__(self) -> Iterator[StepWork]:
        return self

    def __next__(self) -> StepWork:
        if self.mode == "hdp":
            return self._hdp_step(next(self.loader))
        micro_batches = [next(self.loader) for _ in range(self.cfg.train.grad_accum)]
        if self.mode == "dp":
            return StepWork([row_work(mb) for mb in micro_batches])
        return StepWork([self._cp_work(mb) for mb in micro_batches])

    @property
    def tokens_per_step(self) -> int:
        """Input positions of one step's global batch (packed rows x seq_len, padding included)."""
        rows = self.loader.micro_batch_size
        if self.mode != "hdp":
            rows *= self.cfg.train.grad_accum * self.mesh.dp_size
        return rows * self.cfg.train.seq_len

    def _cp_work(self, mb: MicroBatch) -> Work:
        """This rank's part of a micro-batch of its cp group."""
        assert mb.doc_spans is not None
        stream = DocStream.from_rows(mb.input_ids, mb.labels, mb.doc_spans)
        mesh, p = self.mesh, self.mesh.cp_size
        if p == 1:
            return Work(pack_shard(stream), tuple(stream.lengths))
        if self.cfg.parallel.cp_impl == "ulysses":
            shard = ulysses_shard(stream, mesh.cp_group, mesh.cp_rank, p, self.model.attention_backend)
        else:
            shard = ring_shard(stream, mesh.cp_ranks, mesh.rank, self.cfg.model.attention)
        return Work(shard, tuple(stream.lengths), 1.0 / p)

    def _hdp_step(self, mb: MicroBatch) -> StepWork:
        """Plan the global batch (identically on every rank) and cut out this rank's jobs; with
        sharded model states (``parallel.shard=fsdp``) as lock-step rounds (``build_rounds``)."""
        assert mb.doc_spans is not None
        stream = DocStream.from_rows(mb.input_ids, mb.labels, mb.doc_spans)
        balance = self.cfg.parallel.hdp_balance
        plan = plan_hdp(stream.lengths, self.mesh.world_size, self.capacity, self.cost, balance=balance)
        self.last_plan = plan
        rounds = build_rounds(plan, self.cost) if self.lock_step else None
        work = hdp_work(plan, stream, self.mesh.rank, self.cfg.model.attention, rounds)
        per_rank = [len(plan.rank_jobs(r)) for r in range(plan.n_ranks)]
        stats = {
            "hdp_jobs": len(plan.jobs),
            "hdp_rings": sum(len(j.ranks) > 1 for j in plan.jobs),
            "hdp_rank_jobs_min": min(per_rank),
            "hdp_rank_jobs_max": max(per_rank),
            "planned_imbalance": plan.imbalance,
        }
        if rounds is not None:
            empty = rounds.empty_per_rank
            stats |= {
                "hdp_rounds": len(rounds.rounds),
                "hdp_empty_rounds": sum(empty),  # padding micro-batches over all ranks
                "hdp_empty_rounds_max": max(empty),  # on the rank with the most
                "hdp_empty_fraction": rounds.empty_fraction,
                "planned_round_slowdown": rounds.makespan / plan.makespan if plan.makespan > 0 else 1.0,
            }
        return StepWork(work, num_tokens=stream.num_loss_tokens, stats=stats)


def hdp_work(
    plan: HdpPlan, stream: DocStream, rank: int, kernel: str, rounds: HdpRounds | None = None
) -> list[Work]:
    """This rank's micro-batches of an hdp step: its jobs in the global order, or with ``rounds``
    one per round (a padding micro-batch where it has no job). ``kernel``: ring attention's block
    kernel (``model.attention``)."""
    jobs = plan.rank_jobs(rank) if rounds is None else rounds.rank_rounds(rank)
    work = []
    for job in jobs:
        if job is None:
            work.append(Work(padding_shard(), (), 0.0))
            continue
        part = stream.select(job.docs)
        if len(job.ranks) == 1:
            work.append(Work(pack_shard(part), tuple(part.lengths)))
        else:
            shard = ring_shard(part, job.ranks, rank, kernel)
            work.append(Work(shard, tuple(part.lengths), 1.0 / len(job.ranks)))
    return work


HDP_COST_FILE = "hdp_cost.json"


def hdp_cost_model(cfg: JobConfig, mesh: Mesh, model: CausalLM) -> tuple[CostModel, str]:
    """Mode hdp's cost model and where it came from (``parallel.hdp_cost``).

    ``profile``: every rank times one forward + backward of this model on each pack of
    ``profile_packs(token capacity)`` (random tokens, the model's own attention core; the fastest of
    two passes after a warm-up; gradients dropped after), the times are averaged over the ranks
    (every rank then plans alike) and ``fit_cost_model`` fits attention ~ s^2, row-wise work ~ s and
    a per-micro-batch constant; on several ranks the ring hop is timed too (``_ring_hop_seconds_per_token``). The fit
    is kept in ``output_dir/hdp_cost.json`` with what it was measured for (model, capacity, dtype,
    device, activation settings); a re-run of the same job (a resume) reads it back, so its plans
    are the first run's."""
    if cfg.parallel.hdp_cost == "default":
        return DEFAULT_COST, "default"
    capacity = token_capacity(cfg)
    key = {
        "model": dataclasses.asdict(cfg.model),
        "activation": dataclasses.asdict(cfg.activation),
        "capacity": capacity,
        "dtype": cfg.train.dtype,
        "device": mesh.device.type,
    }
    path = Path(cfg.output_dir) / HDP_COST_FILE
    kept = None
    if mesh.is_main and path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(path.read_text())
            if saved["for"] == json.loads(json.dumps(key)):
                kept = saved["cost"]
    kept = broadcast_object(kept, mesh)
    if kept is not None:
        return CostModel(**kept), str(path)
    packs = profile_packs(capacity)
    times = [_time_pack(cfg, mesh, model, lengths) for lengths in [packs[0], *packs]][1:]  # first: warm-up
    hop = _ring_hop_seconds_per_token(mesh, model, capacity) if mesh.world_size > 1 else 0.0
    mean = [t / mesh.world_size for t in all_reduce_sums([*times, hop], mesh)]
    cost = fit_cost_model(list(zip(packs, mean[:-1], strict=True)), comm=mean[-1])
    if mesh.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "for": key,
            "cost": dataclasses.asdict(cost),
            "samples": [[p, t] for p, t in zip(packs, mean[:-1], strict=True)],
        }
        path.write_text(json.dumps(record, indent=1))
    return cost, "profiled"


RING_PROBE_BYTES = 64 * 2**20


def _ring_hop_seconds_per_token(mesh: Mesh, model: CausalLM, capacity: int, runs: int = 2) -> float:
    """Seconds per token of one ring hop: every rank sends to the next and receives from the
    previous what a ring moves per token over all layers (K and V forward; K, V, dK and dV
    backward), for up to ``capacity`` tokens within ``RING_PROBE_BYTES``; the fastest of ``runs``
    after a warm-up."""
    import torch.distributed as dist

    from longtrain.trainer.model.hf import head_dim_of

    c = model.config
    dtype = next(model.parameters()).dtype
    per_token = 6 * c.num_key_value_heads * head_dim_of(c) * c.num_hidden_layers
    tokens = max(1, min(capacity, RING_PROBE_BYTES // (per_token * dtype.itemsize)))
    send = torch.zeros(tokens * per_token, dtype=dtype, device=mesh.device)
    recv = torch.empty_like(send)
    nxt, prev = (mesh.rank + 1) % mesh.world_size, (mesh.rank - 1) % mesh.world_size
    best = float("inf")
    for i in range(runs + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for req in (dist.isend(send, nxt), dist.irecv(recv, prev)):
            assert req is not None  # None only for ranks outside the group, and every rank is in it
            req.wait()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best / tokens


def _time_pack(cfg: JobConfig, mesh: Mesh, model: CausalLM, lengths: Sequence[int], runs: int = 2) -> float:
    """Seconds of one forward + backward of ``model`` on a pack of random documents ``lengths``
    (the fastest of ``runs``); the gradients are dropped after."""
    gen = torch.Generator().manual_seed(len(lengths))  # not the training RNG: a resume replays it
    t = sum(lengths)
    ids = torch.randint(0, model.config.vocab_size, (t,), generator=gen)
    targets = torch.roll(ids, -1)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
        targets[cu[-1] - 1] = IGNORE_INDEX
    stream = DocStream(ids, targets, tuple(cu))
    shard = pack_shard(stream).to(mesh.device)
    bf16 = cfg.train.dtype == "bfloat16"
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        with torch.autocast(mesh.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(
                input_ids=shard.input_ids,
                targets=shard.targets,
                position_ids=shard.position_ids,
                doc_spans=shard.doc_spans,
                loss_normalizer=max(shard.num_loss_tokens, 1),
            )
        out.loss.backward()
        if mesh.device.type == "cuda":
            torch.cuda.synchronize(mesh.device)
        best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return best


def token_capacity(cfg: JobConfig) -> int:
    """Tokens per rank and micro-batch in mode hdp (``parallel.token_capacity``)."""
    if cfg.parallel.token_capacity is not None:
        return cfg.parallel.token_capacity
    return cfg.train.seq_len * cfg.data.micro_batch_size


def check_layout(cfg: JobConfig, mesh: Mesh, model: CausalLM) -> None:
    """Context-parallel settings that need the world size or the model, checked before the first step."""
    par = cfg.parallel
    if par.mode == "cp" and par.cp_impl == "ulysses":
        c = model.config
        check_ulysses(c.num_attention_heads, c.num_key_value_heads, mesh.cp_size)
    if par.mode == "cp" and par.shard == "fsdp" and mesh.dp_size > 1 and _probes_alpha(model):
        # the probe runs a layer through FSDP's hooks (all-gathers) when a rank's row count changes,
        # and the cp groups' row counts differ: ranks would enter different collectives
        raise ConfigError(
            "activation.alpha=auto with parallel.mode=cp, parallel.shard=fsdp and several cp groups "
            f"(parallel.data_parallel={mesh.dp_size}) would hang (the alpha probe all-gathers layers when "
            "a group's row count changes); set activation.alpha to a number, or parallel.shard=none"
        )
    if par.mode == "hdp" and par.shard == "fsdp" and mesh.distributed and _probes_alpha(model):
        # the same: in a round the ranks run micro-batches of different row counts
        raise ConfigError(
            "activation.alpha=auto with parallel.mode=hdp and parallel.shard=fsdp would hang (the alpha "
            "probe all-gathers layers when a rank's row count changes, and hdp ranks' row counts differ); "
            "set activation.alpha to a number, or parallel.shard=none"
        )
    if par.mode == "hdp":
        # the longest document a packed row can hold is train.seq_len tokens
        ring_size(cfg.train.seq_len, token_capacity(cfg), mesh.world_size)


def hdp_rows_per_step(cfg: JobConfig) -> int:
    """Packed rows of one hdp step: ``train.global_batch_tokens / train.seq_len``."""
    tokens = cfg.train.global_batch_tokens
    if tokens is None:
        return cfg.data.micro_batch_size * cfg.train.grad_accum
    return tokens // cfg.train.seq_len


def _probes_alpha(model: CausalLM) -> bool:
    """Whether the activation executor measures alpha=auto when the row count changes."""
    executor = model.layer_executor
    return isinstance(executor, TokenwiseExecutor) and executor.alpha_resolver is not None


def probe_with_local_core(model: CausalLM) -> None:
    """activation.alpha=auto profiles one layer forward whenever a new row count appears. Under cp
    and hdp that forward's core would be a ring or Ulysses core whose partners are not probing (a
    hang), so the probe runs the model's own core on the local rows instead: it measures the
    row-wise work and bytes per row, which do not depend on the core."""
    executor = model.layer_executor
    if not isinstance(executor, TokenwiseExecutor) or executor.alpha_resolver is None:
        return
    resolve, local = executor.alpha_resolver, model.attention_backend
    executor.alpha_resolver = lambda layers, x, ctx: resolve(
        layers, x, dataclasses.replace(ctx, backend=local)
    )

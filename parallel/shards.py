"""A batch of documents as one token stream, and the rows of it one rank runs.

Context parallelism cuts documents across ranks, so targets are shifted on the whole stream
first (row i predicts targets[i]; a document's last row predicts nothing) and then sharded with
the rows: shifting inside a shard would pair a row with its neighbour in the shard, not in the
document.

    stream = DocStream.from_rows(input_ids_bs, labels_bs, doc_spans)   # documents with targets
    job    = stream.select(docs)                                        # an hdp job's documents
    shard  = pack_shard(job) | ring_shard(job, ranks, rank, kernel) | ulysses_shard(job, group, rank, core)
    shard  = padding_shard()   # a lock-step round without a job for this rank
    model(input_ids=shard.input_ids, targets=shard.targets, position_ids=shard.position_ids,
          doc_spans=shard.doc_spans, attention=shard.attention)

Padding rows of a layout (zigzag chunks, the Ulysses tail) get token 0 and target IGNORE: they
reach no real row's keys and add nothing to the loss, and a shard of padding only gives loss 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.trainer.model.attention import AttentionBackend, DocSpans
from longtrain.trainer.model.loss import IGNORE_INDEX

from .ring import RingAttention
from .ulysses import ContiguousLayout, UlyssesAttention
from .zigzag import ZigzagLayout


@dataclass(frozen=True)
class DocStream:
    """Documents as one stream: input_ids and pre-shifted targets [t] int64, boundaries cu_seqlens."""

    input_ids: Tensor  # [t] int64
    targets: Tensor  # [t] int64, IGNORE_INDEX at every document's last row
    cu_seqlens: tuple[int, ...]

    @classmethod
    def from_rows(cls, input_ids_bs: Tensor, labels_bs: Tensor, docs: DocSpans) -> DocStream:
        """The documents of packed rows (labels unshifted, HF convention) that hold at least one
        target; the others (padding runs, one-token documents) change neither loss nor gradients
        and are left out."""
        ids_t = input_ids_bs.reshape(-1)
        labels_t = labels_bs.reshape(-1)
        targets_t = torch.full_like(labels_t, IGNORE_INDEX)
        targets_t[:-1] = labels_t[1:]  # a document's first label is IGNORE: no target crosses a boundary
        keep = [(s, e) for s, e in docs.spans if bool((targets_t[s:e] != IGNORE_INDEX).any())]
        if not keep:
            empty = torch.empty(0, dtype=torch.long)
            return cls(empty, empty, (0,))
        return cls(
            torch.cat([ids_t[s:e] for s, e in keep]),
            torch.cat([targets_t[s:e] for s, e in keep]),
            _cumsum([e - s for s, e in keep]),
        )

    @classmethod
    def concat(cls, streams: Sequence[DocStream]) -> DocStream:
        lengths = [n for s in streams for n in s.lengths]
        if not lengths:
            return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), (0,))
        return cls(
            torch.cat([s.input_ids for s in streams]),
            torch.cat([s.targets for s in streams]),
            _cumsum(lengths),
        )

    @property
    def lengths(self) -> list[int]:
        cu = self.cu_seqlens
        return [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def select(self, docs: Sequence[int]) -> DocStream:
        """The stream of documents ``docs`` (indices into ``lengths``), in that order."""
        cu = self.cu_seqlens
        spans = [(cu[d], cu[d + 1]) for d in docs]
        if not spans:
            return DocStream.concat([])
        return DocStream(
            torch.cat([self.input_ids[s:e] for s, e in spans]),
            torch.cat([self.targets[s:e] for s, e in spans]),
            _cumsum([e - s for s, e in spans]),
        )


@dataclass(frozen=True)
class Shard:
    """The rows one rank runs in one forward: [1, t_local] int64 each, their documents (the
    attention core's view) and the core (None = the model's own)."""

    input_ids: Tensor
    targets: Tensor
    position_ids: Tensor
    doc_spans: DocSpans
    attention: AttentionBackend | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Shard:
        return Shard(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.position_ids.to(device, non_blocking=non_blocking),
            self.doc_spans,
            self.attention,
        )


def pack_shard(stream: DocStream) -> Shard:
    """All of the stream on one rank (its documents attended by the model's own core)."""
    positions = [torch.arange(n) for n in stream.lengths]
    pos = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
    return Shard(stream.input_ids[None], stream.targets[None], pos[None], DocSpans(stream.cu_seqlens))


def padding_shard() -> Shard:
    """One row of padding (token 0, no target): a rank's micro-batch in a lock-step round where it
    has no job (parallel/hdp_rounds.py). It runs every layer, so it joins the round's collectives,
    and gives loss 0 and exactly zero gradients."""
    one = torch.zeros(1, 1, dtype=torch.long)
    return Shard(one, torch.full_like(one, IGNORE_INDEX), one.clone(), DocSpans((0, 1)))


def _local(stream: DocStream, index: Tensor, positions: Tensor, docs: DocSpans, core) -> Shard:
    """Rows ``index`` of the stream (-1 = padding: token 0, no target)."""
    valid = index >= 0
    safe = index.clamp(min=0)
    ids = torch.where(valid, stream.input_ids[safe], 0) if len(index) else index.clone()
    tgt = torch.where(valid, stream.targets[safe], IGNORE_INDEX) if len(index) else index.clone()
    return Shard(ids[None], tgt[None], positions[None], docs, core)


def ring_shard(stream: DocStream, ranks: Sequence[int], rank: int, kernel: str = "auto") -> Shard:
    """Ring position ``ranks.index(rank)`` of the stream's zigzag layout over ``ranks`` (global
    ranks in ring order), attended by ``RingAttention`` with block kernel ``kernel``."""
    layout = ZigzagLayout(stream.cu_seqlens, len(ranks))
    pos = list(ranks).index(rank)
    core = RingAttention(ranks, layout, kernel, rank=rank)
    return _local(stream, layout.global_index(pos), layout.positions(pos), layout.local_docs, core)


def ulysses_shard(stream: DocStream, group, rank: int, size: int, backend: AttentionBackend) -> Shard:
    """Slice ``rank`` (position in ``group``, of ``size`` ranks) of the stream cut into equal
    contiguous slices, attended by ``UlyssesAttention`` over ``group`` with the local ``backend``."""
    layout = ContiguousLayout(stream.cu_seqlens, size)
    core = UlyssesAttention(layout, backend, group=group)
    return _local(stream, layout.global_index(rank), layout.positions(rank), layout.local_docs, core)


def _cumsum(lengths: Sequence[int]) -> tuple[int, ...]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return tuple(cu)

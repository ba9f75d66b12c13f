"""``PackedLoader``: a deterministic, resumable, infinite stream of micro-batches for one DP rank.

Global micro-batch ``g`` (the same counter on every rank) lives in epoch ``e = g // steps``
with ``steps = num_rows // (B * world)`` (the remainder rows of an epoch are skipped; the next
epoch's permutation reaches them). Within the epoch, rank ``r`` takes rows
``perm_e[k*B*world + r*B : k*B*world + (r+1)*B]`` with ``k = g % steps`` and
``perm_e = torch.randperm(num_rows, generator=seeded(seed + e))``. So every micro-batch is
addressed by index: resuming sets ``g`` and replays nothing, and the ranks of one step read
disjoint rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from longtrain.config_checks import ConfigError, Limits, check_value
from longtrain.trainer.data.packing import PackedRows
from longtrain.trainer.model.attention import DocSpans
from longtrain.trainer.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of packed rows. Labels are unshifted (Hugging Face convention).

    Built on the host, where its document spans and loss-token count are computed once; ``to``
    carries both to the device copy, so the forward needs no device sync to find documents.
    """

    input_ids: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, IGNORE_INDEX at document starts and padding
    position_ids: torch.Tensor  # [b, s] int64, 0 at every document start
    num_loss_tokens: int = -1  # targets after the shift: (labels[:, 1:] != IGNORE_INDEX).sum(); -1 = compute
    doc_spans: DocSpans | None = None  # document boundaries of the flattened rows; None = compute

    def __post_init__(self) -> None:
        if self.num_loss_tokens < 0:
            count = int((self.labels[:, 1:] != IGNORE_INDEX).sum())
            object.__setattr__(self, "num_loss_tokens", count)
        if self.doc_spans is None:
            object.__setattr__(self, "doc_spans", DocSpans.from_position_ids(self.position_ids))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        """Copy to ``device``; ``num_loss_tokens`` and ``doc_spans`` are carried over (no device sync)."""
        return MicroBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            num_loss_tokens=self.num_loss_tokens,
            doc_spans=self.doc_spans,
        )


def rows_batch(rows: PackedRows, idx: torch.Tensor | slice) -> MicroBatch:
    """The micro-batch made of ``rows[idx]`` (int64 copies of the packed int32 rows)."""
    return MicroBatch(
        input_ids=rows.input_ids[idx].long(),  # [b, s]
        labels=rows.labels[idx].long(),  # [b, s]
        position_ids=rows.position_ids[idx].long(),  # [b, s]
    )


class PackedLoader:
    """Infinite iterator of ``MicroBatch`` for rank ``dp_rank`` of ``dp_world``."""

    def __init__(
        self,
        rows: PackedRows,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        check_value("data.micro_batch_size", micro_batch_size, int, Limits(min=1))
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
        rows_per_step = micro_batch_size * dp_world
        if len(rows) < rows_per_step:
            raise ConfigError(
                f"only {len(rows)} packed rows of train.seq_len={rows.seq_len} tokens, fewer than "
                f"data.micro_batch_size={micro_batch_size} x {dp_world} data-parallel ranks; "
                "lower train.seq_len or data.micro_batch_size, or use more data (data.max_documents)"
            )
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = len(rows) // rows_per_step
        self.consumed_microbatches = 0
        self._perm_epoch = -1
        self._perm = torch.arange(len(rows))

    @property
    def epoch(self) -> int:
        """Epoch of the next micro-batch."""
        return self.consumed_microbatches // self.steps_per_epoch

    def row_indices(self, g: int) -> torch.Tensor:
        """Row indices [B] of this rank's global micro-batch ``g``."""
        epoch, k = divmod(g, self.steps_per_epoch)
        if self.shuffle and epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.rows), generator=generator)
            self._perm_epoch = epoch
        start = (k * self.dp_world + self.dp_rank) * self.micro_batch_size
        return self._perm[start : start + self.micro_batch_size]

    def batch(self, g: int) -> MicroBatch:
        """This rank's global micro-batch ``g`` (does not move the iterator)."""
        return rows_batch(self.rows, self.row_indices(g))

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> MicroBatch:
        mb = self.batch(self.consumed_microbatches)
        self.consumed_microbatches += 1
        return mb

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_microbatches": self.consumed_microbatches,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_rows": len(self.rows),
            "micro_batch_size": self.micro_batch_size,
            "dp_world": self.dp_world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["consumed_microbatches"]``; the layout must match the saved one."""
        expected = {
            "seed": self.seed,
            "num_rows": len(self.rows),
            "micro_batch_size": self.micro_batch_size,
            "dp_world": self.dp_world,
        }
        changed = [
            f"{k}: saved {state[k]}, now {v}" for k, v in expected.items() if k in state and state[k] != v
        ]
        if changed:
            raise ConfigError(
                "data loader state does not match this run (" + "; ".join(changed) + "); resume with "
                "the same data.*, train.seq_len, seed and data-parallel size"
            )
        self.consumed_microbatches = int(state["consumed_microbatches"])


def eval_batches(
    rows: PackedRows,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    max_batches: int | None = None,
    equal_counts: bool = False,
) -> Iterator[MicroBatch]:
    """One pass over ``rows`` in order, for evaluation: rank r takes micro-batches r, r + world, ...
    (the last one may be short), at most ``max_batches`` of them.

    ``equal_counts``: every rank yields the same number of micro-batches; a rank past the end gets
    a filler (the first rows with every label ignored: zero loss tokens). A sharded model's forward
    all-gathers parameters, so a rank that ran one forward fewer than the others would leave them
    waiting in that collective forever. Without it a rank may get none."""
    starts = list(range(dp_rank * micro_batch_size, len(rows), dp_world * micro_batch_size))
    count = len(starts)
    if equal_counts:  # the count of rank 0, which has the most
        count = len(range(0, len(rows), dp_world * micro_batch_size))
    if max_batches is not None:
        count = min(count, max_batches)
    for start in starts[:count]:
        yield rows_batch(rows, slice(start, start + micro_batch_size))
    for _ in range(count - len(starts[:count])):
        filler = rows_batch(rows, slice(0, micro_batch_size))
        yield MicroBatch(filler.input_ids, torch.full_like(filler.labels, IGNORE_INDEX), filler.position_ids)

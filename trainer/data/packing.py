"""Pack tokenised documents into rows of exactly ``seq_len`` tokens (best-fit decreasing).

Row layout (one row, ``s = seq_len``; here two documents A, B and three padding tokens)::

    input_ids     a0  a1  a2  b0  b1  p   p   p
    labels      -100  a1  a2 -100 b1 -100 -100 -100
    position_ids   0   1   2   0   1   0   1   2

* ``labels`` follow the Hugging Face convention: *not* shifted (the model shifts, logits[i]
  predicts labels[i + 1]). They equal ``input_ids`` except -100 at the first token of every
  document and at every padding token, so the plain shift never predicts across a boundary.
* ``position_ids`` restart at 0 at every document start and the padding is its own final
  "document" with its own 0..k run: the model derives document boundaries from
  ``position_ids == 0``.
* Documents longer than ``seq_len`` are cut into ``seq_len`` chunks; every chunk is a document of
  its own (positions restart, its first token is not a target).

All rows are built once into int32 tensors; a row is addressed by index, so resuming never
replays data.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from longtrain.config_checks import Limits, check_value
from longtrain.trainer.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRows:
    """All packed rows of a split. int32 halves host memory; the loader widens to int64."""

    input_ids: torch.Tensor  # [n, s] int32
    labels: torch.Tensor  # [n, s] int32, IGNORE_INDEX at document starts and padding
    position_ids: torch.Tensor  # [n, s] int32, 0 at every document start (padding run included)
    num_documents: int  # documents after cutting long ones into chunks
    num_pad_tokens: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Document (non-padding) tokens."""
        return self.input_ids.numel() - self.num_pad_tokens


def pack_documents(
    documents: Sequence[Sequence[int]], seq_len: int, pad_id: int, *, seed: int | None = None
) -> PackedRows:
    """Best-fit-decreasing packing of ``documents`` (token lists, eos already appended).

    With ``seed`` the documents are shuffled before the (stable) sort by length, so equal-length
    documents land in seed-dependent rows; ``seed=None`` keeps the input order. Either way the
    result is a pure function of the arguments. Empty documents are dropped.
    """
    check_value("train.seq_len", seq_len, int, Limits(min=1))
    docs = [np.asarray(d, dtype=np.int32) for d in documents]

    # Cut documents longer than seq_len: pieces are (document index, start, length).
    pieces: list[tuple[int, int, int]] = []
    for i, doc in enumerate(docs):
        for start in range(0, len(doc), seq_len):
            pieces.append((i, start, min(seq_len, len(doc) - start)))

    order = list(range(len(pieces)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda p: -pieces[p][2])  # stable: ties keep the (shuffled) order

    rows = _best_fit(order, [p[2] for p in pieces], seq_len)

    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)  # [n, s]
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)  # [n, s]
    position_ids = np.empty((n, seq_len), dtype=np.int32)  # [n, s]
    arange = np.arange(seq_len, dtype=np.int32)
    num_pad = 0
    for r, row in enumerate(rows):
        offset = 0
        for p in row:
            i, start, length = pieces[p]
            tokens = docs[i][start : start + length]
            input_ids[r, offset : offset + length] = tokens
            labels[r, offset + 1 : offset + length] = tokens[1:]  # first token: no target
            position_ids[r, offset : offset + length] = arange[:length]
            offset += length
        position_ids[r, offset:] = arange[: seq_len - offset]  # padding: its own 0..k run
        num_pad += seq_len - offset
    return PackedRows(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        num_documents=len(pieces),
        num_pad_tokens=num_pad,
    )


def _best_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Put each item (in ``order``) into the open row with the least room that still fits it.

    Open rows are bucketed by remaining room; ``rooms`` is the sorted list of distinct rooms
    (at most ``capacity`` entries), so each placement is a bisect plus O(capacity) list moves.
    """
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining room of open rows
    open_rows: dict[int, list[int]] = {}  # room -> row indices with exactly that room
    for item in order:
        length = lengths[item]
        k = bisect.bisect_left(rooms, length)
        if k == len(rooms):  # nothing fits: open a new row
            r, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[k]
            r = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room], rooms[k]
        rows[r].append(item)
        room -= length
        if room > 0:
            if room not in open_rows:
                bisect.insort(rooms, room)
                open_rows[room] = []
            open_rows[room].append(r)
    return rows

"""Per-document zigzag split of a packed token stream over a ring of n ranks.

Each document of length L is cut into 2n chunks of c = ceil(L / 2n) rows (the last ones padded);
the rank at ring position p holds chunks p and 2n-1-p of every document, so causal work is even
over the ring (chunk p sees few keys, chunk 2n-1-p many). The local stream keeps documents in
order, each as [chunk p | chunk 2n-1-p] (2c rows), so every rank holds the same number of rows:

    global  doc A (L=10, n=2, c=3):  a0 a1 a2 | a3 a4 a5 | a6 a7 a8 | a9 -- --
    rank 0 (chunks 0, 3):            a0 a1 a2   a9 -- --
    rank 1 (chunks 1, 2):            a3 a4 a5   a6 a7 a8

Padding always lies after a document's last real row, so causal masking keeps it out of every
real row's keys; padded rows get out 0 / lse -inf from the ring core. ``positions`` gives each
local row its position inside its document (RoPE follows the permutation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from longtrain.trainer.model.attention import DocSpans


@dataclass(frozen=True)
class ZigzagLayout:
    cu_seqlens: tuple[int, ...]  # the global stream's documents (DocSpans.cu_seqlens)
    n: int  # ring size

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"ring size must be >= 1, got {self.n}")

    @classmethod
    def build(cls, docs: DocSpans, n: int) -> ZigzagLayout:
        return cls(docs.cu_seqlens, n)

    @property
    def global_len(self) -> int:
        return self.cu_seqlens[-1] if self.cu_seqlens else 0

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        return DocSpans(self.cu_seqlens).spans

    @cached_property
    def chunks(self) -> tuple[int, ...]:
        """Rows per chunk of each (non-empty) document: ceil(L / 2n)."""
        return tuple(-(-(e - s) // (2 * self.n)) for s, e in self.spans)

    @property
    def local_len(self) -> int:
        return 2 * sum(self.chunks)

    @cached_property
    def local_docs(self) -> DocSpans:
        """The local stream's documents (2c rows each), what the ring core is called with."""
        cu = [0]
        for c in self.chunks:
            cu.append(cu[-1] + 2 * c)
        return DocSpans(tuple(cu))

    def _rows(self, pos: int) -> tuple[Tensor, Tensor]:
        """(global row index or -1, position inside the document) of every local row at ring position pos."""
        if not 0 <= pos < self.n:
            raise ValueError(f"ring position {pos} outside 0..{self.n - 1}")
        index, position = [], []
        for (s0, s1), c in zip(self.spans, self.chunks, strict=True):
            for j in (pos, 2 * self.n - 1 - pos):
                p = torch.arange(j * c, (j + 1) * c)
                position.append(p)
                index.append(torch.where(p < s1 - s0, s0 + p, -1))
        if not index:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(index), torch.cat(position)

    def global_index(self, pos: int) -> Tensor:
        """[local_len] int64: the global row each local row holds, -1 for padding."""
        return self._rows(pos)[0]

    def positions(self, pos: int) -> Tensor:
        """[local_len] int64: each local row's position inside its document (RoPE position ids;
        padding rows continue the count)."""
        return self._rows(pos)[1]

    def valid(self, pos: int) -> Tensor:
        """[local_len] bool: real (not padding) rows."""
        return self.global_index(pos) >= 0

    def shard(self, x: Tensor, pos: int, dim: int = 0) -> Tensor:
        """The local rows of a global tensor along ``dim`` (padding rows are zeros)."""
        idx = self.global_index(pos).to(x.device)
        local = x.index_select(dim, idx.clamp(min=0))
        mask_shape = [1] * x.dim()
        mask_shape[dim] = -1
        return local.masked_fill((idx < 0).view(mask_shape), 0)

    def unshard(self, locals_: list[Tensor], dim: int = 0) -> Tensor:
        """Inverse of ``shard``: the global tensor from every ring position's local tensor."""
        first = locals_[0]
        shape = list(first.shape)
        shape[dim] = self.global_len
        out = first.new_zeros(shape)
        for pos, local in enumerate(locals_):
            idx = self.global_index(pos).to(local.device)
            keep = torch.nonzero(idx >= 0).view(-1)
            out.index_copy_(dim, idx[keep], local.index_select(dim, keep))
        return out

"""Zigzag ring attention over an explicit, ordered list of global ranks.

``RingAttention`` is an attention core (trainer/model/attention.py's ``AttentionBackend``): called
through ``attention(q, k, v, layout.local_docs, ring)`` it is an autograd Function whose saved
tensors are exactly (q, k, v, out, lse) of the local rows, so the token-wise executor offloads
out and lse whole and later calls the explicit ``backward`` with them.

Forward (rank at ring position p of N, local rows = chunks p and 2N-1-p of every document, see
zigzag.py): K and V travel around the ring; at step s the rank holds the KV of position
src = (p - s) mod N and computes, per document,

    s = 0      causal block: local queries vs local keys (the two chunks in order)
    src < p    full block: all local queries vs src's first chunk
    src > p    full block: the local second chunk's queries vs all of src's keys

merging the partial (out, lse) in logsumexp space in float32 (float64 for float64). The next KV
is posted (isend/irecv) before the current block is computed, so communication overlaps compute.

Backward: a second ring in which (K, V) travel ahead as in forward and (dK, dV) travel one step
behind, accumulating every rank's contribution to that KV block, and one final hop returns them
to their owner. Every block backward uses the merged out and lse (exact partial gradients).

All P2P goes through the default (global) process group with global ranks: a ring over any
subset of the world needs no process group of its own. Padding rows (documents not divisible by
2N) get out 0 and lse -inf; a rank holding only padding returns zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.trainer.model.attention import DocSpans, attention

from .blocks import BlockKernel, build_block_kernel, lse_dtype
from .zigzag import ZigzagLayout

# Finite stand-in for the lse of padding rows in backward: exp(S - lse) is 0, never inf/NaN.
_PAD_LSE = 1e30
_TAG_KV, _TAG_DKV = 0, 1 << 20


def merge_partial(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: (acc_out, acc_lse) <- logsumexp merge with a partial (out, lse) over disjoint keys.

    acc_out [t, n, d] and acc_lse [n, t] in float32/float64; rows where both lse are -inf stay
    (0, -inf) instead of NaN."""
    new = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))
    ref = new.masked_fill(new == float("-inf"), 0.0)
    w_acc = torch.exp(acc_lse - ref).transpose(0, 1).unsqueeze(-1)  # [t, n, 1]
    w_new = torch.exp(lse.to(acc_lse.dtype) - ref).transpose(0, 1).unsqueeze(-1)
    acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new)


def _take(x: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """Rows of x in the given spans, contiguous (a view when there is one span)."""
    if len(spans) == 1:
        return x[spans[0][0] : spans[0][1]]
    return torch.cat([x[a:b] for a, b in spans])


def _cu(spans: list[tuple[int, int]]) -> tuple[int, ...]:
    cu = [0]
    for a, b in spans:
        cu.append(cu[-1] + b - a)
    return tuple(cu)


class _Block:
    """Which rows of the local queries meet which rows of the visiting keys at one ring step."""

    def __init__(self, layout: ZigzagLayout, pos: int, src: int):
        cu = layout.local_docs.cu_seqlens
        whole = [(cu[j], cu[j + 1]) for j in range(len(cu) - 1)]
        first = [(a, a + c) for (a, _), c in zip(whole, layout.chunks, strict=True)]
        second = [(a + c, b) for (a, b), c in zip(whole, layout.chunks, strict=True)]
        self.causal = src == pos
        if src == pos:
            self.q_spans, self.k_spans = whole, whole
        elif src < pos:
            self.q_spans, self.k_spans = whole, first
        else:
            self.q_spans, self.k_spans = second, whole
        self.cu_q, self.cu_k = _cu(self.q_spans), _cu(self.k_spans)

    def scatter(self, dst: Tensor, rows: Tensor, dim: int = 0, add: bool = True) -> None:
        """dst[q rows] (+)= rows, rows being the block's query rows in order."""
        for (a, b), (c0, c1) in zip(self.q_spans, zip(self.cu_q, self.cu_q[1:], strict=False), strict=True):
            src = rows.narrow(dim, c0, c1 - c0)
            view = dst.narrow(dim, a, b - a)
            view.add_(src) if add else view.copy_(src)


class RingAttention:
    """Zigzag ring attention core for one ring job.

    ranks: the ring's global ranks in ring order (this process must be one of them).
    layout: the zigzag layout of the job's documents over ``len(ranks)`` positions.
    kernel: a block kernel or its name (``blocks.build_block_kernel``).
    """

    name = "ring"

    def __init__(
        self,
        ranks: Sequence[int],
        layout: ZigzagLayout,
        kernel: BlockKernel | str = "auto",
        rank: int | None = None,
    ):
        self.ranks = tuple(int(r) for r in ranks)
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ring ranks must be distinct, got {self.ranks}")
        if layout.n != len(self.ranks):
            raise ValueError(f"layout is for a ring of {layout.n}, got {len(self.ranks)} ranks")
        me = dist.get_rank() if rank is None else rank
        if me not in self.ranks:
            raise ValueError(f"rank {me} is not in the ring {self.ranks}")
        self.layout = layout
        self.kernel = build_block_kernel(kernel) if isinstance(kernel, str) else kernel
        self.pos = self.ranks.index(me)
        n = len(self.ranks)
        self.next, self.prev = self.ranks[(self.pos + 1) % n], self.ranks[(self.pos - 1) % n]
        self.blocks = [_Block(layout, self.pos, (self.pos - s) % n) for s in range(n)]
        self.pad_rows = torch.nonzero(~layout.valid(self.pos)).view(-1)

    def _check(self, q: Tensor, docs: DocSpans) -> None:
        if docs.cu_seqlens != self.layout.local_docs.cu_seqlens or q.shape[0] != self.layout.local_len:
            raise ValueError(
                f"ring core called with {q.shape[0]} rows / {docs.cu_seqlens}, its layout holds "
                f"{self.layout.local_len} rows / {self.layout.local_docs.cu_seqlens}"
            )

    def _exchange(self, send: Tensor, tag: int) -> tuple[Tensor, list]:
        """Post send -> next and a receive of the same shape <- prev; returns (buffer, requests)."""
        recv = torch.empty_like(send)
        reqs = [dist.isend(send, self.next, tag=tag), dist.irecv(recv, self.prev, tag=tag)]
        return recv, reqs

    def forward(self, q: Tensor, k: Tensor, v: Tensor, docs: DocSpans, scale: float) -> tuple[Tensor, Tensor]:
        self._check(q, docs)
        t, n_heads = q.shape[0], q.shape[1]
        acc_out = torch.zeros(q.shape, dtype=lse_dtype(q), device=q.device)
        acc_lse = torch.full((n_heads, t), float("-inf"), dtype=lse_dtype(q), device=q.device)
        kv = torch.stack((k, v))  # [2, t, n_kv, d]: one message per step
        for step, blk in enumerate(self.blocks):
            reqs: list = []
            if step + 1 < len(self.blocks):
                kv_next, reqs = self._exchange(kv, _TAG_KV + step)
            o, lse = self.kernel.forward(
                _take(q, blk.q_spans),
                _take(kv[0], blk.k_spans),
                _take(kv[1], blk.k_spans),
                blk.cu_q,
                blk.cu_k,
                blk.causal,
                scale,
            )
            for (a, b), c0 in zip(blk.q_spans, blk.cu_q, strict=False):
                merge_partial(acc_out[a:b], acc_lse[:, a:b], o[c0 : c0 + b - a], lse[:, c0 : c0 + b - a])
            for r in reqs:
                r.wait()
            if reqs:
                kv = kv_next
        out = acc_out.to(q.dtype)
        out[self.pad_rows] = 0
        acc_lse[:, self.pad_rows] = float("-inf")
        return out, acc_lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        docs: DocSpans,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check(q, docs)
        if len(self.pad_rows):  # padding rows contribute nothing: dout 0, P = exp(S - big) = 0
            dout, lse = dout.clone(), lse.clone()
            dout[self.pad_rows] = 0
            lse[:, self.pad_rows] = _PAD_LSE
        acc = lse_dtype(q)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack((k, v))
        sends: list = []
        dkv_in: Tensor | None = None
        for step, blk in enumerate(self.blocks):
            kv_reqs: list = []
            if step + 1 < len(self.blocks):
                kv_next, kv_reqs = self._exchange(kv, _TAG_KV + step)
            dkv_reqs: list = []
            if step > 0:  # (dK, dV) of this step's KV block, accumulated by the ranks before us
                dkv_in = torch.empty(kv.shape, dtype=acc, device=kv.device)
                dkv_reqs = [dist.irecv(dkv_in, self.prev, tag=_TAG_DKV + step)]
            g_q, g_k, g_v = self.kernel.backward(
                _take(dout, blk.q_spans),
                _take(q, blk.q_spans),
                _take(kv[0], blk.k_spans),
                _take(kv[1], blk.k_spans),
                _take(out, blk.q_spans),
                torch.cat([lse[:, a:b] for a, b in blk.q_spans], dim=1),
                blk.cu_q,
                blk.cu_k,
                blk.causal,
                scale,
            )
            blk.scatter(dq, g_q.to(acc))
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            for (a, b), c0 in zip(blk.k_spans, blk.cu_k, strict=False):
                dkv[0, a:b] += g_k[c0 : c0 + b - a]
                dkv[1, a:b] += g_v[c0 : c0 + b - a]
            for r in dkv_reqs:
                r.wait()
            if dkv_in is not None and step > 0:
                dkv += dkv_in
            if len(self.blocks) > 1:  # pass on; after the last step this hop reaches the owner
                sends.append((dkv, dist.isend(dkv, self.next, tag=_TAG_DKV + step + 1)))
            for r in kv_reqs:
                r.wait()
            if kv_reqs:
                kv = kv_next
        if len(self.blocks) > 1:
            own = torch.empty(kv.shape, dtype=acc, device=kv.device)
            last = dist.irecv(own, self.prev, tag=_TAG_DKV + len(self.blocks))
            assert last is not None  # None only for ranks outside the group
            last.wait()
        else:
            own = dkv
        for _, req in sends:
            req.wait()
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


def ring_attention(
    q_tnd: Tensor,
    k_tkd: Tensor,
    v_tkd: Tensor,
    ring: RingAttention,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable ring attention on the local rows (the layout's ``shard`` of the job):
    returns (out [t_local, n, d], lse [n, t_local])."""
    return attention(q_tnd, k_tkd, v_tkd, ring.layout.local_docs, ring, scale)

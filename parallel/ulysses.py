"""Ulysses context parallelism: all-to-all from sequence-sharded to head-sharded and back.

A group of P ranks holds a packed token stream cut into P contiguous slices (padded at the end to
a multiple of P: never the user's problem). Before attention an all-to-all gives every rank all
rows for n/P query heads and n_kv/P kv heads; the ordinary per-document attention core runs on
whole documents; a second all-to-all returns (out, lse) to the sequence layout. P must divide
the kv heads (each rank keeps whole GQA groups).

The explicit backward redoes the forward's all-to-alls on (dout, q, k, v, out, lse) (attention is
not recomputed, only moved) and sends dq, dk, dv back: the core keeps nothing between forward
and backward beyond what the executor hands it. Per link and layer: 4 * t * h / P elements
forward (q, k, v, out), about twice that in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.config_checks import ConfigError
from longtrain.trainer.model.attention import AttentionBackend, DocSpans, attention, build_attention_backend


def check_ulysses(n_heads: int, n_kv_heads: int, degree: int) -> None:
    """ConfigError unless a Ulysses group of ``degree`` ranks can split the heads."""
    if degree < 1 or n_kv_heads % degree or n_heads % degree:
        raise ConfigError(
            f"parallel.cp_impl=ulysses needs the context-parallel degree ({degree}) to divide the model's "
            f"num_kv_heads ({n_kv_heads}); set parallel.cp_impl=ring or a context-parallel degree dividing "
            f"{n_kv_heads}"
        )


@dataclass(frozen=True)
class ContiguousLayout:
    """The global stream (documents ``cu_seqlens``) cut into n equal contiguous slices, the last
    padded: rank p holds rows [p * local_len, (p + 1) * local_len)."""

    cu_seqlens: tuple[int, ...]
    n: int

    @property
    def global_len(self) -> int:
        return self.cu_seqlens[-1] if self.cu_seqlens else 0

    @property
    def local_len(self) -> int:
        return -(-self.global_len // self.n)

    @property
    def local_docs(self) -> DocSpans:
        """What the core is called with: the local slice as one span (documents are the layout's)."""
        return DocSpans((0, self.local_len))

    def global_index(self, pos: int) -> Tensor:
        rows = torch.arange(pos * self.local_len, (pos + 1) * self.local_len)
        return torch.where(rows < self.global_len, rows, -1)

    def positions(self, pos: int) -> Tensor:
        """Each local row's position inside its document (padding continues the last document)."""
        rows = torch.arange(pos * self.local_len, (pos + 1) * self.local_len)
        starts = torch.tensor(self.cu_seqlens[:-1] or (0,))
        doc = torch.searchsorted(starts, rows, right=True) - 1
        return rows - starts[doc.clamp(min=0)]

    def valid(self, pos: int) -> Tensor:
        return self.global_index(pos) >= 0

    def shard(self, x: Tensor, pos: int, dim: int = 0) -> Tensor:
        idx = self.global_index(pos).to(x.device)
        local = x.index_select(dim, idx.clamp(min=0))
        shape = [1] * x.dim()
        shape[dim] = -1
        return local.masked_fill((idx < 0).view(shape), 0)

    def unshard(self, locals_: list[Tensor], dim: int = 0) -> Tensor:
        return torch.cat(locals_, dim=dim).narrow(dim, 0, self.global_len)


def _seq_to_heads(x_thd: Tensor, p: int, group) -> Tensor:
    """[t_local, h, d] -> [p * t_local, h / p, d] (all rows, this rank's heads)."""
    tl, h, d = x_thd.shape
    send = x_thd.reshape(tl, p, h // p, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(p * tl, h // p, d)


def _heads_to_seq(y_thd: Tensor, p: int, group) -> Tensor:
    """[p * t_local, h / p, d] -> [t_local, h, d]."""
    t, hp, d = y_thd.shape
    send = y_thd.reshape(p, t // p, hp, d).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(t // p, p * hp, d)


def _lse_heads_to_seq(lse_ht: Tensor, p: int, group) -> Tensor:
    """[h / p, p * t_local] -> [h, t_local]."""
    hp, t = lse_ht.shape
    send = lse_ht.reshape(hp, p, t // p).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(p * hp, t // p)


def _lse_seq_to_heads(lse_ht: Tensor, p: int, group) -> Tensor:
    """[h, t_local] -> [h / p, p * t_local]."""
    h, tl = lse_ht.shape
    send = lse_ht.reshape(p, h // p, tl).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(h // p, p * tl)


class UlyssesAttention:
    """Ulysses attention core for one group (``group``: a process group of the P ranks, e.g. the
    mesh's cp axis; None = the world) on a ``ContiguousLayout``; ``backend`` is the local core run
    on whole documents (any backend of attention.py)."""

    name = "ulysses"

    def __init__(self, layout: ContiguousLayout, backend: AttentionBackend | str = "auto", group=None):
        self.group = group
        self.p = dist.get_world_size(group)
        if layout.n != self.p:
            raise ValueError(f"layout is for {layout.n} ranks, the group has {self.p}")
        self.layout = layout
        self.docs = DocSpans(layout.cu_seqlens)
        self.backend = build_attention_backend(backend) if isinstance(backend, str) else backend
        self.pad_rows = torch.nonzero(~layout.valid(dist.get_rank(group))).view(-1)

    def _check(self, q: Tensor, k: Tensor) -> None:
        check_ulysses(q.shape[1], k.shape[1], self.p)
        if q.shape[0] != self.layout.local_len:
            raise ValueError(
                f"ulysses core called with {q.shape[0]} rows, its layout holds {self.layout.local_len}"
            )

    def forward(self, q: Tensor, k: Tensor, v: Tensor, docs: DocSpans, scale: float) -> tuple[Tensor, Tensor]:
        self._check(q, k)
        p, g, t = self.p, self.group, self.layout.global_len
        q_h, k_h, v_h = (_seq_to_heads(x, p, g) for x in (q, k, v))
        out_h = torch.zeros_like(q_h)
        lse_h = torch.full(
            (q_h.shape[1], q_h.shape[0]), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32)
        )
        out_h[:t], lse_h[:, :t] = self.backend.forward(q_h[:t], k_h[:t], v_h[:t], self.docs, scale)
        return _heads_to_seq(out_h, p, g), _lse_heads_to_seq(lse_h, p, g)

    def backward(self, dout, q, k, v, out, lse, docs, scale):
        self._check(q, k)
        p, g, t = self.p, self.group, self.layout.global_len
        do_h, q_h, k_h, v_h, out_h = (_seq_to_heads(x.contiguous(), p, g) for x in (dout, q, k, v, out))
        lse_h = _lse_seq_to_heads(lse.contiguous(), p, g)
        dq_h, dk_h, dv_h = torch.zeros_like(q_h), torch.zeros_like(k_h), torch.zeros_like(v_h)
        dq_h[:t], dk_h[:t], dv_h[:t] = self.backend.backward(
            do_h[:t], q_h[:t], k_h[:t], v_h[:t], out_h[:t], lse_h[:, :t], self.docs, scale
        )
        return tuple(_heads_to_seq(x, p, g) for x in (dq_h, dk_h, dv_h))


def ulysses_attention(q_tnd, k_tkd, v_tkd, core: UlyssesAttention, scale: float | None = None):
    """Differentiable Ulysses attention on the local rows: (out [t_local, n, d], lse [n, t_local])."""
    return attention(q_tnd, k_tkd, v_tkd, core.layout.local_docs, core, scale)

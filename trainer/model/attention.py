"""Attention cores: ``(q, k, v, doc spans) -> (out, lse)`` with an explicit backward.

Every backend implements ``forward`` and ``backward`` itself, so the plain path (through
``attention`` below, an autograd Function) and the activation-memory paths in ``offload/`` (which
save q, k, v, out, lse and call ``backward`` directly) run exactly the same kernels. Attention is
never recomputed by the memory-saving paths; the logsumexp is what makes its backward possible
without the score matrix.

Layout ("thd", the flash-attn varlen layout): the batch is flattened into one token stream.

    q_tnd  [t, n_heads, d]       k_tkd, v_tkd  [t, n_kv_heads, d]
    out    [t, n_heads, d]       lse_nt        [n_heads, t]  float32 (float64 for float64 inputs)

Documents never attend to each other: ``DocSpans`` lists their boundaries on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DocSpans:
    """Boundaries of the documents in a flattened token stream (host-side, no device syncs)."""

    cu_seqlens: tuple[int, ...]  # (0, end_0, end_1, ..., t)

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> DocSpans:
        """A document starts wherever ``position_ids == 0`` (and at every batch row start)."""
        pos_bs = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        b, s = pos_bs.shape
        starts_bs = pos_bs.detach().cpu() == 0
        starts_bs[:, 0] = True
        starts = torch.nonzero(starts_bs.reshape(-1)).view(-1).tolist()
        return cls(tuple(starts) + (b * s,))

    @classmethod
    def single(cls, t: int) -> DocSpans:
        return cls((0, t))

    @classmethod
    def rows(cls, b: int, s: int) -> DocSpans:
        """Every one of b rows of s tokens is one document."""
        return cls(tuple(range(0, b * s + 1, s)) if s else (0,))

    @property
    def spans(self) -> list[tuple[int, int]]:
        c = self.cu_seqlens
        return [(c[i], c[i + 1]) for i in range(len(c) - 1) if c[i + 1] > c[i]]

    @property
    def max_len(self) -> int:
        return max((e - s for s, e in self.spans), default=0)

    def tensor(self, device: torch.device | str) -> Tensor:
        return torch.tensor(self.cu_seqlens, dtype=torch.int32, device=device)


class AttentionBackend(Protocol):
    name: str

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, docs: DocSpans, scale: float
    ) -> tuple[Tensor, Tensor]: ...

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
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def _expand_kv(kv_tkd: Tensor, n_heads: int) -> Tensor:
    """GQA: repeat each kv head for its group of query heads ([t, kv, d] -> [t, n, d])."""
    t, n_kv, d = kv_tkd.shape
    if n_kv == n_heads:
        return kv_tkd
    return kv_tkd[:, :, None, :].expand(t, n_kv, n_heads // n_kv, d).reshape(t, n_heads, d)


def _fold_kv_grad(dkv_tnd: Tensor, n_kv: int) -> Tensor:
    """Adjoint of ``_expand_kv``: sum the gradients of the query heads sharing a kv head."""
    t, n, d = dkv_tnd.shape
    if n == n_kv:
        return dkv_tnd
    return dkv_tnd.view(t, n_kv, n // n_kv, d).sum(dim=2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    """float32 (float64 when the inputs are float64, so exactness checks stay exact)."""
    return torch.promote_types(q.dtype, torch.float32)


def _bhsd(x_tnd: Tensor) -> Tensor:
    return x_tnd.transpose(0, 1).unsqueeze(0)  # [t, n, d] -> [1, n, t, d]


def _tnd(x_1nsd: Tensor) -> Tensor:
    return x_1nsd.squeeze(0).transpose(0, 1)  # [1, n, t, d] -> [t, n, d]


def _kv_groups(q: Tensor, k: Tensor):
    """GQA without materialising repeated k/v: per kv head j, (query heads of its group, the kernel's
    [1, g, t, d] view of head j repeated g times by a stride-0 head axis). One group of all heads
    when there is no GQA. The CPU flash kernel reads strided inputs, and each head's result is
    the one the repeated-copy inputs give, bit for bit (tests/unit/test_attention_gqa.py)."""
    n, n_kv = q.shape[1], k.shape[1]
    if n == n_kv:
        yield slice(0, n), slice(0, n), 1
        return
    g = n // n_kv
    for j in range(n_kv):
        yield slice(j * g, (j + 1) * g), slice(j, j + 1), g


def _kv_view(kv_tkd: Tensor, heads: slice, g: int) -> Tensor:
    kv = _bhsd(kv_tkd[:, heads])  # [1, kv heads, t, d]
    return kv if g == 1 else kv.expand(1, g, kv.shape[2], kv.shape[3])


def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """torch's CPU flash kernel on one query block and one key block (thd layout; k/v may have
    fewer heads than q, GQA): (out [tq, n, d], lse [n, tq])."""
    groups = list(_kv_groups(q, k))
    if q.shape[1] == k.shape[1]:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale
        )
        # the kernel lays out o as [t, n, d] (a no-op here) and lse as [t, n]: the callers save
        # both for backward and map views into contiguous storages
        return _tnd(o).contiguous(), lse.squeeze(0).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q), device=q.device)
    for heads, kv_heads, g in groups:
        o_g, lse_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q[:, heads]), _kv_view(k, kv_heads, g), _kv_view(v, kv_heads, g), 0.0, causal, scale=scale
        )
        out[:, heads] = _tnd(o_g)
        lse[heads] = lse_g.squeeze(0)
        del o_g, lse_g
    return out, lse


def cpu_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of ``cpu_flash_forward``: (dq, dk, dv), dk/dv with k's heads. Under GQA each
    group's dq is written into one [tq, n, d] buffer and its dk/dv summed over the group's query
    heads, so no [t, n, d] copy of k, v or their gradients exists (the kernel reads strided dout)."""
    groups = list(_kv_groups(q, k))
    lse_1nt = lse.unsqueeze(0).contiguous()

    def kernel(heads: slice, kv_heads: slice, g: int) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout[:, heads]),
            _bhsd(q[:, heads]),
            _kv_view(k, kv_heads, g),
            _kv_view(v, kv_heads, g),
            _bhsd(out[:, heads]),
            lse_1nt[:, heads],
            0.0,
            causal,
            scale=scale,
        )

    if q.shape[1] == k.shape[1]:
        dq, dk, dv = kernel(*groups[0])
        return _tnd(dq), _tnd(dk), _tnd(dv)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for heads, kv_heads, g in groups:
        dq_g, dk_g, dv_g = kernel(heads, kv_heads, g)
        dq[:, heads] = _tnd(dq_g)
        # [t, g, d] -> [t, 1, d], summed straight into the group's head of dk / dv (no temporary)
        torch.sum(_tnd(dk_g), dim=1, keepdim=True, out=dk[:, kv_heads])
        torch.sum(_tnd(dv_g), dim=1, keepdim=True, out=dv[:, kv_heads])
        del dq_g, dk_g, dv_g  # before the next group's kernel allocates its own
    return dq, dk, dv


class _PerDocBackend:
    """Shared per-document loop; subclasses implement one causal document."""

    name = "base"

    def forward(self, q, k, v, docs, scale):
        n = q.shape[1]
        k, v = _expand_kv(k, n), _expand_kv(v, n)
        out = torch.empty_like(q)
        lse = torch.empty(n, q.shape[0], dtype=_lse_dtype(q), device=q.device)
        for s0, s1 in docs.spans:
            o_doc, lse_doc = self.doc_forward(q[s0:s1], k[s0:s1], v[s0:s1], scale)
            out[s0:s1] = o_doc
            lse[:, s0:s1] = lse_doc
        return out, lse

    def backward(self, dout, q, k, v, out, lse, docs, scale):
        n, n_kv = q.shape[1], k.shape[1]
        k_full, v_full = _expand_kv(k, n), _expand_kv(v, n)
        dq = torch.empty_like(q)
        dk_full = torch.empty_like(q)
        dv_full = torch.empty_like(q)
        for s0, s1 in docs.spans:
            dq[s0:s1], dk_full[s0:s1], dv_full[s0:s1] = self.doc_backward(
                dout[s0:s1], q[s0:s1], k_full[s0:s1], v_full[s0:s1], out[s0:s1], lse[:, s0:s1], scale
            )
        return dq, _fold_kv_grad(dk_full, n_kv), _fold_kv_grad(dv_full, n_kv)


class ReferenceAttention(_PerDocBackend):
    """Plain math (scores, softmax, weighted sum) in the input dtype: the oracle for tests."""

    name = "reference"

    @staticmethod
    def _math(q, k, v, scale):
        # q, k, v: [L, n, d] -> scores [n, L, L]
        scores = torch.einsum("ind,jnd->nij", q, k) * scale
        L = q.shape[0]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [n, L]
        probs = torch.exp(scores - lse[..., None])
        out = torch.einsum("nij,jnd->ind", probs, v)
        return out, lse

    def doc_forward(self, q, k, v, scale):
        out, lse = self._math(q, k, v, scale)
        return out, lse.to(_lse_dtype(q))

    def doc_backward(self, dout, q, k, v, out, lse, scale):
        with torch.enable_grad():
            qkv = [x.detach().requires_grad_() for x in (q, k, v)]
            o, _ = self._math(*qkv, scale)
            return torch.autograd.grad(o, qkv, dout)


class CpuFlashAttention(_PerDocBackend):
    """torch's CPU flash kernel: returns the logsumexp and has a backward that consumes it. The
    kernel takes k/v with fewer heads (see ``_kv_groups``), and one document runs without the
    per-document buffers: at the attention backward, the peak of a token-wise layer, this holds
    about 8 [t, hidden] tensors fewer than expanding k/v and copying the kernel's results."""

    name = "cpu_flash"

    def forward(self, q, k, v, docs, scale):
        if len(docs.spans) == 1:
            return cpu_flash_forward(q, k, v, True, scale)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q), device=q.device)
        for s0, s1 in docs.spans:
            out[s0:s1], lse[:, s0:s1] = cpu_flash_forward(q[s0:s1], k[s0:s1], v[s0:s1], True, scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, docs, scale):
        if len(docs.spans) == 1:
            return cpu_flash_backward(dout, q, k, v, out, lse, True, scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for s0, s1 in docs.spans:
            dq[s0:s1], dk[s0:s1], dv[s0:s1] = cpu_flash_backward(
                dout[s0:s1], q[s0:s1], k[s0:s1], v[s0:s1], out[s0:s1], lse[:, s0:s1], True, scale
            )
        return dq, dk, dv

    def doc_forward(self, q, k, v, scale):
        return cpu_flash_forward(q, k, v, True, scale)

    def doc_backward(self, dout, q, k, v, out, lse, scale):
        return cpu_flash_backward(dout, q, k, v, out, lse, True, scale)


class SdpaAttention(_PerDocBackend):
    """``F.scaled_dot_product_attention`` for the output; the lse from blocked score rows.

    SDPA does not return the logsumexp, so it is computed in blocks of query rows, each block's
    scores [n, rows, L] under ``score_budget_bytes``: a cross-check backend, slower than the flash
    kernels. The backward rebuilds the output graph with SDPA (the fused kernel recomputes its own
    scores, as flash backward does) and takes its vector-Jacobian product.
    """

    name = "sdpa"

    def __init__(self, score_budget_bytes: int = 256 * 2**20) -> None:
        self.score_budget_bytes = score_budget_bytes

    def block_rows(self, n_heads: int, doc_len: int, dtype: torch.dtype) -> int:
        """Query rows per lse block: scores and their exp for one block fit the budget."""
        per_row = n_heads * max(doc_len, 1) * torch.finfo(dtype).bits // 8 * 2
        return max(1, self.score_budget_bytes // per_row)

    def _lse(self, q, k, scale):
        L, n = q.shape[0], q.shape[1]
        dt = _lse_dtype(q)
        lse = torch.empty(n, L, dtype=dt, device=q.device)
        block = self.block_rows(n, L, dt)
        for i0 in range(0, L, block):
            i1 = min(L, i0 + block)
            scores = torch.einsum("ind,jnd->nij", q[i0:i1].to(dt), k[:i1].to(dt)) * scale
            rows = torch.arange(i0, i1, device=q.device)[:, None]
            cols = torch.arange(i1, device=q.device)[None, :]
            lse[:, i0:i1] = torch.logsumexp(scores.masked_fill_(cols > rows, float("-inf")), dim=-1)
        return lse

    def doc_forward(self, q, k, v, scale):
        o = F.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(v), is_causal=True, scale=scale)
        return _tnd(o), self._lse(q, k, scale)

    def doc_backward(self, dout, q, k, v, out, lse, scale):
        with torch.enable_grad():
            qkv = [x.detach().requires_grad_() for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*(_bhsd(x) for x in qkv), is_causal=True, scale=scale)
            return torch.autograd.grad(_tnd(o), qkv, dout)


class FlashAttnVarlen:
    """flash-attn's varlen kernels (CUDA only; used when the package is installed).

    Written against flash-attn >= 2.6's private forward/backward entry points, called with
    keyword arguments. Not exercised on our CPU machines: the GPU test (marked ``gpu``) covers it.
    """

    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward

        self._fwd, self._bwd = _flash_attn_varlen_forward, _flash_attn_varlen_backward

    def _common(self, docs: DocSpans, device, scale: float) -> dict:
        cu = docs.tensor(device)
        return dict(
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=docs.max_len,
            max_seqlen_k=docs.max_len,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=True,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
        )

    def forward(self, q, k, v, docs, scale):
        out, lse, *_ = self._fwd(q, k, v, return_softmax=False, **self._common(docs, q.device, scale))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, docs, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            deterministic=False,
            rng_state=None,
            **self._common(docs, q.device, scale),
        )
        return dq, dk, dv


BACKENDS = ("auto", "cpu_flash", "sdpa", "flash_attn", "reference")


class AutoAttention:
    """Picks a kernel per call from the inputs: flash-attn for fp16/bf16 on CUDA when installed,
    SDPA on CUDA otherwise, the CPU flash kernel on CPU. Forward and backward see the same inputs'
    device and dtype, so both always use the same kernel."""

    name = "auto"

    def __init__(self) -> None:
        self._cpu, self._sdpa, self._flash = CpuFlashAttention(), SdpaAttention(), None
        try:
            self._flash = FlashAttnVarlen()
        except ImportError:
            pass

    def pick(self, q: Tensor) -> AttentionBackend:
        if not q.is_cuda:
            return self._cpu
        if self._flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            return self._flash
        return self._sdpa

    def forward(self, q, k, v, docs, scale):
        return self.pick(q).forward(q, k, v, docs, scale)

    def backward(self, dout, q, k, v, out, lse, docs, scale):
        return self.pick(q).backward(dout, q, k, v, out, lse, docs, scale)


def build_attention_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """Pick an attention core by name (``auto``: see ``AutoAttention``)."""
    if name == "auto":
        return AutoAttention()
    if name == "cpu_flash":
        return CpuFlashAttention()
    if name == "sdpa":
        return SdpaAttention()
    if name == "reference":
        return ReferenceAttention()
    if name == "flash_attn":
        return FlashAttnVarlen()  # ImportError without the flash-attn package
    raise ValueError(f"model.attention must be one of {', '.join(BACKENDS)}, got {name!r}")


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend, docs, scale):
        out, lse = backend.forward(q, k, v, docs, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backend, ctx.docs, ctx.scale = backend, docs, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.docs, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(
    q_tnd: Tensor,
    k_tkd: Tensor,
    v_tkd: Tensor,
    docs: DocSpans,
    backend: AttentionBackend,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable per-document causal attention: returns (out [t, n, d], lse [n, t] float32)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q_tnd.shape[-1])
    return _AttentionFunction.apply(q_tnd, k_tkd, v_tkd, backend, docs, scale)

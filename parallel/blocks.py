"""Block kernels for ring attention: (query rows, key rows) blocks, causal or full, with an lse-aware
backward.

A ring step computes, per document, one block of the score matrix: the diagonal block (the rank's
own keys: causal) or a block strictly below the diagonal (another rank's keys: full, no mask). The
block's partial (out, lse) are merged in logsumexp space; the backward of a block must use the
*merged* (global) out and lse, so only kernels whose backward consumes an external lse are valid
here (flash-style: P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * O))). ``ReferenceAttention`` and
``SdpaAttention`` in trainer/model/attention.py recompute their own softmax in backward, so they
cannot be block kernels; ``MathBlocks`` below is the lse-aware oracle.

Layout (thd, as in attention.py), varlen: pair j is query rows q[cu_q[j]:cu_q[j+1]] against key
rows k[cu_k[j]:cu_k[j+1]]:

    q_tnd [tq, n, d]   k_tkd, v_tkd [tk, n_kv, d]   ->   out [tq, n, d], lse_nt [n, tq]

A causal block needs cu_q == cu_k (square pairs, so top-left and bottom-right alignment agree).
Query rows of a pair with no keys get out 0 and lse -inf.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from longtrain.trainer.model.attention import (
    AttentionBackend,
    CpuFlashAttention,
    DocSpans,
    FlashAttnVarlen,
    cpu_flash_backward,
    cpu_flash_forward,
)

Cu = tuple[int, ...]


class BlockKernel(Protocol):
    name: str

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cu_q: Cu, cu_k: Cu, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]: ...

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        cu_q: Cu,
        cu_k: Cu,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def lse_dtype(q: Tensor) -> torch.dtype:
    """float32 (float64 for float64 inputs), as the attention cores."""
    return torch.promote_types(q.dtype, torch.float32)


def expand_kv(kv_tkd: Tensor, n_heads: int) -> Tensor:
    """GQA: [t, n_kv, d] -> [t, n, d], each kv head repeated for its group of query heads."""
    t, n_kv, d = kv_tkd.shape
    if n_kv == n_heads:
        return kv_tkd
    return kv_tkd[:, :, None, :].expand(t, n_kv, n_heads // n_kv, d).reshape(t, n_heads, d)


def fold_kv_grad(dkv_tnd: Tensor, n_kv: int) -> Tensor:
    """Adjoint of ``expand_kv``: [t, n, d] -> [t, n_kv, d]."""
    t, n, d = dkv_tnd.shape
    return dkv_tnd if n == n_kv else dkv_tnd.view(t, n_kv, n // n_kv, d).sum(dim=2)


def _pairs(cu_q: Cu, cu_k: Cu) -> list[tuple[int, int, int, int]]:
    if len(cu_q) != len(cu_k):
        raise ValueError(f"block pairs: {len(cu_q) - 1} query spans vs {len(cu_k) - 1} key spans")
    return [(cu_q[j], cu_q[j + 1], cu_k[j], cu_k[j + 1]) for j in range(len(cu_q) - 1)]


def _check_causal(cu_q: Cu, cu_k: Cu) -> None:
    if cu_q != cu_k:
        raise ValueError("a causal block needs square pairs (cu_q == cu_k)")


class _PerPairBlocks:
    """Loops over pairs; subclasses implement one pair (q [Lq, n, d], k/v [Lk, n, d] expanded)."""

    name = "base"

    def forward(self, q, k, v, cu_q, cu_k, causal, scale):
        if causal:
            _check_causal(cu_q, cu_k)
        n = q.shape[1]
        k, v = expand_kv(k, n), expand_kv(v, n)
        out = torch.zeros_like(q)
        lse = torch.full((n, q.shape[0]), float("-inf"), dtype=lse_dtype(q), device=q.device)
        for q0, q1, k0, k1 in _pairs(cu_q, cu_k):
            if q1 > q0 and k1 > k0:
                out[q0:q1], lse[:, q0:q1] = self.pair_forward(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        n, n_kv = q.shape[1], k.shape[1]
        k_full, v_full = expand_kv(k, n), expand_kv(v, n)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k_full), torch.zeros_like(v_full)
        for q0, q1, k0, k1 in _pairs(cu_q, cu_k):
            if q1 > q0 and k1 > k0:
                g = self.pair_backward(
                    dout[q0:q1],
                    q[q0:q1],
                    k_full[k0:k1],
                    v_full[k0:k1],
                    out[q0:q1],
                    lse[:, q0:q1],
                    causal,
                    scale,
                )
                dq[q0:q1] += g[0]
                dk[k0:k1] += g[1]
                dv[k0:k1] += g[2]
        return dq, fold_kv_grad(dk, n_kv), fold_kv_grad(dv, n_kv)


class MathBlocks(_PerPairBlocks):
    """Plain math in float32/float64 with the external lse in backward: the oracle block kernel
    (any device; memory O(n * Lq * Lk) per pair)."""

    name = "math"

    @staticmethod
    def _scores(q, k, causal, scale):
        dt = lse_dtype(q)
        s_nij = torch.einsum("ind,jnd->nij", q.to(dt), k.to(dt)) * scale
        if causal:
            L = q.shape[0]
            s_nij = s_nij.masked_fill(
                ~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf")
            )
        return s_nij

    def pair_forward(self, q, k, v, causal, scale):
        s_nij = self._scores(q, k, causal, scale)
        lse_ni = torch.logsumexp(s_nij, dim=-1)
        p_nij = torch.exp(s_nij - lse_ni[..., None])
        out = torch.einsum("nij,jnd->ind", p_nij, v.to(s_nij.dtype))
        return out.to(q.dtype), lse_ni

    def pair_backward(self, dout, q, k, v, out, lse, causal, scale):
        dt = lse_dtype(q)
        s_nij = self._scores(q, k, causal, scale)
        p_nij = torch.exp(s_nij - lse.to(dt)[..., None])  # the merged lse: P of the global softmax
        do, vv = dout.to(dt), v.to(dt)
        dv = torch.einsum("nij,ind->jnd", p_nij, do)
        dp_nij = torch.einsum("ind,jnd->nij", do, vv)
        delta_ni = (do * out.to(dt)).sum(-1).transpose(0, 1)  # rowsum(dO * O) with the merged O
        ds_nij = p_nij * (dp_nij - delta_ni[..., None]) * scale
        dq = torch.einsum("nij,jnd->ind", ds_nij, k.to(dt))
        dk = torch.einsum("nij,ind->jnd", ds_nij, q.to(dt))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CpuFlashBlocks(_PerPairBlocks):
    """torch's CPU flash kernel: causal blocks through ``CpuFlashAttention`` (the single-process
    core, so the diagonal block runs the same kernel), full blocks through the same aten op with
    ``is_causal=False`` (Lq != Lk is fine without a mask)."""

    name = "cpu_flash"

    def __init__(self) -> None:
        self.causal_core: AttentionBackend = CpuFlashAttention()

    def forward(self, q, k, v, cu_q, cu_k, causal, scale):
        if causal:
            _check_causal(cu_q, cu_k)
            return self.causal_core.forward(q, k, v, DocSpans(cu_q), scale)
        return super().forward(q, k, v, cu_q, cu_k, False, scale)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        if causal:
            _check_causal(cu_q, cu_k)
            return self.causal_core.backward(dout, q, k, v, out, lse, DocSpans(cu_q), scale)
        return super().backward(dout, q, k, v, out, lse, cu_q, cu_k, False, scale)

    def pair_forward(self, q, k, v, causal, scale):
        return cpu_flash_forward(q, k, v, causal, scale)

    def pair_backward(self, dout, q, k, v, out, lse, causal, scale):
        return cpu_flash_backward(dout, q, k, v, out, lse, causal, scale)


class FlashAttnBlocks:
    """flash-attn varlen (CUDA, fp16/bf16): causal blocks through ``FlashAttnVarlen``; full blocks
    through the same private entry points with ``causal=False`` and separate cu_seqlens for q and k.
    Not exercised on our CPU machines."""

    name = "flash_attn"

    def __init__(self) -> None:
        self.causal_core = FlashAttnVarlen()

    def _common(self, cu_q: Cu, cu_k: Cu, device, scale: float) -> dict:
        lens_q = [b - a for a, b in zip(cu_q, cu_q[1:], strict=False)]
        lens_k = [b - a for a, b in zip(cu_k, cu_k[1:], strict=False)]
        return dict(
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
            max_seqlen_q=max(lens_q, default=0),
            max_seqlen_k=max(lens_k, default=0),
            dropout_p=0.0,
            softmax_scale=scale,
            causal=False,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
        )

    def forward(self, q, k, v, cu_q, cu_k, causal, scale):
        if causal:
            _check_causal(cu_q, cu_k)
            return self.causal_core.forward(q, k, v, DocSpans(cu_q), scale)
        out, lse, *_ = self.causal_core._fwd(
            q, k, v, return_softmax=False, **self._common(cu_q, cu_k, q.device, scale)
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        if causal:
            _check_causal(cu_q, cu_k)
            return self.causal_core.backward(dout, q, k, v, out, lse, DocSpans(cu_q), scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = self._common(cu_q, cu_k, q.device, scale)
        self.causal_core._bwd(
            dout, q, k, v, out, lse, dq, dk, dv, deterministic=False, rng_state=None, **common
        )
        return dq, dk, dv


BLOCK_KERNELS = ("auto", "cpu_flash", "math", "flash_attn")


class AutoBlocks:
    """CPU: the CPU flash kernel; CUDA fp16/bf16 with flash-attn installed: flash-attn; else math."""

    name = "auto"

    def __init__(self) -> None:
        self._cpu, self._math = CpuFlashBlocks(), MathBlocks()
        self._flash: FlashAttnBlocks | None = None
        try:
            self._flash = FlashAttnBlocks()
        except ImportError:
            pass

    def pick(self, q: Tensor) -> BlockKernel:
        if not q.is_cuda:
            return self._cpu
        if self._flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            return self._flash
        return self._math

    def forward(self, q, k, v, cu_q, cu_k, causal, scale):
        return self.pick(q).forward(q, k, v, cu_q, cu_k, causal, scale)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        return self.pick(q).backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)


def build_block_kernel(name: str) -> BlockKernel:
    """A block kernel by name; ``model.attention`` names map as: auto/sdpa -> auto (sdpa has no
    lse-aware backward), reference -> math, cpu_flash, flash_attn."""
    name = {"sdpa": "auto", "reference": "math"}.get(name, name)
    if name == "auto":
        return AutoBlocks()
    if name == "cpu_flash":
        return CpuFlashBlocks()
    if name == "math":
        return MathBlocks()
    if name == "flash_attn":
        return FlashAttnBlocks()
    raise ValueError(f"block kernel must be one of {', '.join(BLOCK_KERNELS)}, got {name!r}")

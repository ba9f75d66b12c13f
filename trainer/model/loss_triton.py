"""Triton fused final projection + cross-entropy: the logits never leave registers.

Same semantics as `longtrain.trainer.model.loss.linear_cross_entropy`; `fused_linear_cross_entropy`
picks this path for CUDA tensors when Triton imports and falls back to the chunked torch op
otherwise (CPU, float64, no Triton).

Kernels (each logits tile [BLOCK_T, BLOCK_V] is an fp32 accumulation over BLOCK_H slices of
hidden @ W^T, recomputed where needed instead of stored; saved state is one fp32 lse per row):

* `_fwd_kernel`, one program per row block: online logsumexp over the vocab tiles and the
  target logit -> loss_t, lse_t.
* `_grad_hidden_kernel`, one program per row block: d_logits = scale * (softmax - onehot)
  from the saved lse, grad_hidden[rows] += d_logits @ W_tile.
* `_grad_weight_kernel`, one program per vocab tile: grad_W[tile] += d_logits^T @ hidden[rows]
  (and grad_bias[tile] += column sums of d_logits).

Row and column indices are int64 so t*h and V*h may pass 2^31. Each program owns the output
rows it accumulates into (read-modify-write in global memory,
fp32), so there are no atomics and the gradients are deterministic. The price is recomputing
the logits tile in both backward kernels: 5 tile matmuls in total against 4 for a single
backward kernel that would atomically add into grad_W.

Matmul inputs run in the promoted dtype of hidden and weight (bf16 x bf16 uses bf16 tensor
cores with fp32 accumulation; fp32 uses TF32 only when torch.backends.cuda.matmul.allow_tf32 is
set, as torch's own matmuls would). The d_logits tile is cast to that dtype before its matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.trainer.model.loss import IGNORE_INDEX, LOSS_CHUNK_ROWS, check_loss_args, linear_cross_entropy

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for linux x86_64 only
    triton = None

__all__ = ["fused_linear_cross_entropy", "triton_available", "triton_linear_cross_entropy"]


def triton_available(device: torch.device | str) -> bool:
    """True when tensors on `device` can use the Triton kernels (CUDA device and triton installed)."""
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def fused_linear_cross_entropy(
    hidden_th: Tensor,
    weight_vh: Tensor,
    targets_t: Tensor,
    *,
    bias_v: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = LOSS_CHUNK_ROWS,
    reduction: str = "sum",
) -> Tensor:
    """Triton kernels on CUDA, else the chunked torch `linear_cross_entropy` (same arguments).

    `chunk_rows` only matters for the torch fallback; the Triton path keeps O(t) extra memory.
    float64 inputs always take the torch path.
    """
    use_triton = triton_available(hidden_th.device) and torch.float64 not in (
        hidden_th.dtype,
        weight_vh.dtype,
    )
    if use_triton:
        return triton_linear_cross_entropy(
            hidden_th, weight_vh, targets_t, bias_v=bias_v, ignore_index=ignore_index, reduction=reduction
        )
    return linear_cross_entropy(
        hidden_th,
        weight_vh,
        targets_t,
        bias_v=bias_v,
        ignore_index=ignore_index,
        chunk_rows=chunk_rows,
        reduction=reduction,
    )


def triton_linear_cross_entropy(
    hidden_th: Tensor,
    weight_vh: Tensor,
    targets_t: Tensor,
    *,
    bias_v: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    block_t: int = 64,
    block_v: int = 128,
    block_h: int = 64,
    num_warps: int = 8,
) -> Tensor:
    """The Triton path, unconditionally (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    Arguments as `linear_cross_entropy`; block sizes are powers of two >= 16 (tl.dot's minimum).
    Returns the loss in float32.
    """
    if triton is None:
        raise RuntimeError("triton_linear_cross_entropy needs triton; use fused_linear_cross_entropy")
    check_loss_args(hidden_th, weight_vh, targets_t, reduction)
    for name, block in (("block_t", block_t), ("block_v", block_v), ("block_h", block_h)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    blocks = (block_t, block_v, block_h, num_warps)
    return _TritonLinearCrossEntropy.apply(
        hidden_th, weight_vh, bias_v, targets_t, ignore_index, reduction, blocks
    )


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """acc + a @ b with both operands rounded to DOT_DTYPE, products accumulated in fp32.

        UPCAST_DOT (CPU tensors, i.e. the interpreter, whose numpy matmul has no bf16) runs the
        same rounded operands through an fp32 dot: bf16/fp16 products are exact in fp32, so the
        result is the one the tensor-core dot computes, up to summation order.
        """
        a = a.to(DOT_DTYPE)
        b = b.to(DOT_DTYPE)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
        stride_ht, stride_wv,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """hidden[rows] @ W[cols]^T (+ bias) in fp32: [BLOCK_T, BLOCK_V]; -inf in columns >= V."""
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            x = tl.load(
                hidden_ptr + rows[:, None] * stride_ht + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :], other=0.0,
            )  # fmt: skip
            w = tl.load(
                weight_ptr + cols[:, None] * stride_wv + ks[None, :],
                mask=col_mask[:, None] & k_mask[None, :], other=0.0,
            )  # fmt: skip
            acc = _dot(x, tl.trans(w), acc, DOT_DTYPE, PRECISION, UPCAST_DOT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        return tl.where(col_mask[None, :], acc, float("-inf"))

    @triton.jit
    def _d_logits_tile(logits, lse, scale, tgt, cols):
        """scale * (softmax - onehot(target)) for one tile; rows with scale 0 (ignored/padding) give 0."""
        probs = tl.exp(logits - lse[:, None])  # exp(-inf) = 0 past the vocab end
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        return (probs - onehot) * scale[:, None]

    @triton.jit
    def _load_rows(targets_ptr, lse_ptr, scale_ptr, rows, row_mask, ignore_index):
        """Per-row target, lse and gradient scale (0 for ignored and out-of-range rows)."""
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        return tgt, lse, tl.where(tgt != ignore_index, scale, 0.0)

    @triton.jit
    def _add_product(
        out_ptr, out_idx, out_mask, lhs, src_ptr, src_idx, src_mask, stride_src, H,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """out[out_idx, :H] += lhs @ src[src_idx, :H], one BLOCK_H slice of columns at a time.

        out is [*, H] contiguous fp32; lhs is [len(out_idx), len(src_idx)] in DOT_DTYPE."""
        for h0 in range(0, H, BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            src = tl.load(
                src_ptr + src_idx[:, None] * stride_src + ks[None, :],
                mask=src_mask[:, None] & k_mask[None, :], other=0.0,
            )  # fmt: skip
            g_ptrs = out_ptr + out_idx[:, None] * H + ks[None, :]
            g_mask = out_mask[:, None] & k_mask[None, :]
            g = tl.load(g_ptrs, mask=g_mask, other=0.0)
            g = _dot(lhs, src, g, DOT_DTYPE, PRECISION, UPCAST_DOT)
            tl.store(g_ptrs, g, mask=g_mask)

    @triton.jit
    def _fwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr, loss_ptr, lse_ptr,
        T, V, H, stride_ht, stride_wv, ignore_index,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_mask = rows < T
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        max_t = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        sumexp_t = tl.zeros([BLOCK_T], dtype=tl.float32)
        tgt_logit_t = tl.zeros([BLOCK_T], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            logits = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, cols < V, H, stride_ht, stride_wv,
                HAS_BIAS, DOT_DTYPE, PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            # Online logsumexp: every tile has at least one real column, so new_max is finite.
            new_max = tl.maximum(max_t, tl.max(logits, axis=1))
            sumexp_t = sumexp_t * tl.exp(max_t - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            max_t = new_max
            tgt_logit_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        lse_t = max_t + tl.log(sumexp_t)
        tl.store(lse_ptr + rows, lse_t, mask=row_mask)
        tl.store(loss_ptr + rows, tl.where(tgt != ignore_index, lse_t - tgt_logit_t, 0.0), mask=row_mask)

    @triton.jit
    def _grad_hidden_kernel(
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, scale_ptr, grad_hidden_ptr,
        T, V, H, stride_ht, stride_wv, ignore_index,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_mask = rows < T
        tgt, lse, scale = _load_rows(targets_ptr, lse_ptr, scale_ptr, rows, row_mask, ignore_index)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            logits = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H, stride_ht, stride_wv,
                HAS_BIAS, DOT_DTYPE, PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            d_logits = _d_logits_tile(logits, lse, scale, tgt, cols).to(DOT_DTYPE)  # once, not per h slice
            # grad_hidden[rows] += d_logits @ W[cols]; only this program touches these rows
            _add_product(
                grad_hidden_ptr, rows, row_mask, d_logits, weight_ptr, cols, col_mask, stride_wv, H,
                DOT_DTYPE, PRECISION, UPCAST_DOT, BLOCK_H,
            )  # fmt: skip

    @triton.jit
    def _grad_weight_kernel(
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, scale_ptr, grad_weight_ptr, grad_bias_ptr,
        T, V, H, stride_ht, stride_wv, ignore_index,
        HAS_BIAS: tl.constexpr, NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        cols = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        grad_bias = tl.zeros([BLOCK_V], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            row_mask = rows < T
            tgt, lse, scale = _load_rows(targets_ptr, lse_ptr, scale_ptr, rows, row_mask, ignore_index)
            logits = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H, stride_ht, stride_wv,
                HAS_BIAS, DOT_DTYPE, PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            d_logits = _d_logits_tile(logits, lse, scale, tgt, cols)
            if NEED_GRAD_BIAS:
                grad_bias += tl.sum(d_logits, axis=0)
            if NEED_GRAD_WEIGHT:
                d_logits_t = tl.trans(d_logits.to(DOT_DTYPE))  # [BLOCK_V, BLOCK_T]
                # grad_weight[cols] += d_logits^T @ hidden[rows]; only this program touches these columns
                _add_product(
                    grad_weight_ptr, cols, col_mask, d_logits_t, hidden_ptr, rows, row_mask, stride_ht, H,
                    DOT_DTYPE, PRECISION, UPCAST_DOT, BLOCK_H,
                )  # fmt: skip
        if NEED_GRAD_BIAS:
            tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _kernel_consts(hidden_th: Tensor, weight_vh: Tensor, bias_v: Tensor | None) -> dict:
    dot_dtype = torch.promote_types(hidden_th.dtype, weight_vh.dtype)
    if dot_dtype not in _TL_DTYPES:
        raise TypeError(f"triton_linear_cross_entropy supports fp32/bf16/fp16, got {dot_dtype}")
    # input_precision only matters for fp32 operands; bf16/fp16 keep Triton's default.
    ieee = dot_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {
        "HAS_BIAS": bias_v is not None,
        "DOT_DTYPE": _TL_DTYPES[dot_dtype],
        "PRECISION": "ieee" if ieee else "tf32",
        "UPCAST_DOT": hidden_th.device.type == "cpu" and dot_dtype != torch.float32,
    }


class _TritonLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_th, weight_vh, bias_v, targets_t, ignore_index, reduction, blocks):
        hidden_th, weight_vh = hidden_th.contiguous(), weight_vh.contiguous()
        bias_v = None if bias_v is None else bias_v.contiguous()
        targets_t = targets_t.contiguous()
        (t, h), vocab = hidden_th.shape, weight_vh.shape[0]
        block_t, block_v, block_h, num_warps = blocks
        loss_t = hidden_th.new_empty(t, dtype=torch.float32)
        lse_t = hidden_th.new_empty(t, dtype=torch.float32)
        if t > 0:
            _fwd_kernel[(triton.cdiv(t, block_t),)](
                hidden_th, weight_vh, bias_v, targets_t, loss_t, lse_t,
                t, vocab, h, hidden_th.stride(0), weight_vh.stride(0), ignore_index,
                **_kernel_consts(hidden_th, weight_vh, bias_v),
                BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(hidden_th, weight_vh, bias_v, targets_t, lse_t)
        ctx.ignore_index, ctx.reduction, ctx.blocks = ignore_index, reduction, blocks
        return loss_t.sum() if reduction == "sum" else loss_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden_th, weight_vh, bias_v, targets_t, lse_t = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (t, h), vocab = hidden_th.shape, weight_vh.shape[0]
        block_t, block_v, block_h, num_warps = ctx.blocks
        # Upstream gradient per row: one scalar for "sum", one per row for "none".
        scale_t = grad_out.float().expand(t).contiguous()
        consts = _kernel_consts(hidden_th, weight_vh, bias_v)
        args = (t, vocab, h, hidden_th.stride(0), weight_vh.stride(0), ctx.ignore_index)
        blocks = {"BLOCK_T": block_t, "BLOCK_V": block_v, "BLOCK_H": block_h, "num_warps": num_warps}

        grad_h = grad_w = grad_b = None
        if need_h:
            grad_h = torch.zeros(t, h, dtype=torch.float32, device=hidden_th.device)
            if t > 0:
                _grad_hidden_kernel[(triton.cdiv(t, block_t),)](
                    hidden_th, weight_vh, bias_v, targets_t, lse_t, scale_t, grad_h, *args, **consts, **blocks
                )
            grad_h = grad_h.to(hidden_th.dtype)
        if need_w or need_b:
            grad_w = torch.zeros(vocab, h, dtype=torch.float32, device=weight_vh.device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight_vh.device) if need_b else None
            if t > 0:
                _grad_weight_kernel[(triton.cdiv(vocab, block_v),)](
                    hidden_th, weight_vh, bias_v, targets_t, lse_t, scale_t, grad_w, grad_b, *args,
                    NEED_GRAD_WEIGHT=need_w, NEED_GRAD_BIAS=need_b, **consts, **blocks,
                )  # fmt: skip
            grad_w = None if grad_w is None else grad_w.to(weight_vh.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias_v.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None

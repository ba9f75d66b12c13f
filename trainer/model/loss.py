"""Chunked final projection + cross-entropy that never materialises the [tokens, vocab] logits.

For long sequences the logits dominate activation memory: t = 128k tokens x V = 128k vocab in
fp32 is 64 GiB, while the hidden states that produce them are t x h. `linear_cross_entropy`
walks the rows in chunks of `chunk_rows`; each chunk's logits [c, V] live only inside the loop,
so the extra memory is O(chunk_rows * V + V * h) (the second term is the fp32 weight gradient).

Backward design (Liger-style for "sum", recompute for "none"):

* reduction="sum": the gradient of a sum is the same for every row (scaled by one scalar), so
  the forward chunk loop also turns each logits chunk into d_logits = softmax - onehot and
  accumulates grad_hidden and grad_weight right away, while the chunk is still in cache.
  Backward only multiplies them by the scalar grad_output. That is 3 matmuls in total
  (logits, d_logits @ W, d_logits^T @ hidden) - the same as the unfused op - instead of 4
  for a recompute backward. Done only when a gradient is actually needed (grad mode on and
  an input requires grad), so evaluation pays for the forward matmul only.
* reduction="none": every row has its own upstream gradient, which is unknown until backward,
  and grad_weight mixes rows, so it cannot be scaled afterwards. The forward saves the inputs
  and backward reruns the same chunk loop with the per-row scale.

All chunk math runs in float32 (float64 when an input is float64, so fp64 checks are exact),
with autocast switched off inside, whatever dtype the inputs come in; gradients are returned in
the input dtypes and the loss in the compute dtype.
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "LOSS_CHUNK_ROWS", "cross_entropy_reference", "linear_cross_entropy"]

IGNORE_INDEX = -100  # label value that adds no loss (torch's cross_entropy default)
LOSS_CHUNK_ROWS = 4096  # rows per chunk: one [chunk, V] block of logits exists at a time

_REDUCTIONS = ("sum", "none")


def check_loss_args(hidden_th: Tensor, weight_vh: Tensor, targets_t: Tensor, reduction: str) -> None:
    """Shapes and reduction shared by the torch and Triton implementations."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden_th.dim() != 2 or weight_vh.dim() != 2 or hidden_th.shape[1] != weight_vh.shape[1]:
        raise ValueError(
            f"expected hidden [t, h] and weight [V, h], got {tuple(hidden_th.shape)} and {tuple(weight_vh.shape)}"
        )
    if targets_t.shape != hidden_th.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden_th.shape[0]}], got {tuple(targets_t.shape)}")


def cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
) -> Tensor:
    """The plain oracle: full logits [t, V], then `F.cross_entropy`."""
    logits_tv = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits_tv, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(
    hidden_th: Tensor,
    weight_vh: Tensor,
    targets_t: Tensor,
    *,
    bias_v: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = LOSS_CHUNK_ROWS,
    reduction: str = "sum",
) -> Tensor:
    """Cross-entropy of `hidden_th @ weight_vh.T (+ bias_v)` against `targets_t`, chunked over rows.

    Args:
        hidden_th: [t, h] final-norm output rows, any float dtype.
        weight_vh: [V, h] lm_head weight (may be frozen or tied to the embeddings).
        targets_t: [t] integer labels, already shifted; rows equal to `ignore_index` add nothing.
        bias_v: optional [V] bias.
        ignore_index: label value whose rows are skipped.
        chunk_rows: rows per chunk; peak extra memory is O(chunk_rows * V + V * h).
        reduction: "sum" (scalar) or "none" (per-row losses [t], 0 for ignored rows). There is no
            "mean": the caller divides by a token count that may be global across ranks.

    Returns:
        The loss in float32 (float64 if an input is float64).
    """
    check_loss_args(hidden_th, weight_vh, targets_t, reduction)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    inputs = (hidden_th, weight_vh, bias_v)
    grads_wanted = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    return _LinearCrossEntropy.apply(
        hidden_th, weight_vh, bias_v, targets_t, ignore_index, chunk_rows, reduction, grads_wanted
    )


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 if any input is float64 (bf16/fp16 are upcast)."""
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _autocast_off(device: torch.device):
    """Chunk math picks its own dtypes; an enclosing autocast would turn the fp32 matmuls into bf16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _chunk_loop(
    hidden_th: Tensor,
    weight_vh: Tensor,
    bias_v: Tensor | None,
    targets_t: Tensor,
    ignore_index: int,
    chunk_rows: int,
    row_scale_t: Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over row chunks: per-row losses and, for the inputs flagged in `need`, gradients.

    Gradients are those of sum_i row_scale[i] * loss[i] (row_scale=None means all ones).
    Returns (loss_t, grad_hidden_th, grad_weight_vh, grad_bias_v); grads in the compute dtype
    except grad_hidden, which is written straight into the hidden dtype chunk by chunk.
    """
    need_h, need_w, need_b = need
    any_grad = need_h or need_w or need_b
    t = hidden_th.shape[0]
    cdtype = _compute_dtype(hidden_th, weight_vh, bias_v)
    w_vh = weight_vh.to(cdtype)  # no copy when already in cdtype; else one O(V*h) upcast
    b_v = None if bias_v is None else bias_v.to(cdtype)

    loss_t = hidden_th.new_zeros(t, dtype=cdtype)
    grad_h = torch.empty_like(hidden_th) if need_h else None
    grad_w = torch.zeros_like(w_vh) if need_w else None
    grad_b = torch.zeros_like(cast(Tensor, b_v)) if need_b else None  # need_b only when a bias is given

    for start in range(0, t, chunk_rows):
        rows = slice(start, min(start + chunk_rows, t))
        h_ch = hidden_th[rows].to(cdtype)  # [c, h]
        tgt_c = targets_t[rows].long()
        valid_c = tgt_c != ignore_index
        tgt_safe_c = tgt_c.masked_fill(~valid_c, 0)  # gather/scatter index for ignored rows

        logits_cv = h_ch @ w_vh.T if b_v is None else torch.addmm(b_v, h_ch, w_vh.T)
        tgt_logit_c = logits_cv.gather(1, tgt_safe_c[:, None]).squeeze(1)
        # logsumexp by hand so the [c, V] buffer is reused: it becomes exp(logits - max) in place.
        max_c1 = logits_cv.amax(dim=1, keepdim=True)
        exp_cv = logits_cv.sub_(max_c1).exp_()
        sumexp_c = exp_cv.sum(dim=1)
        lse_c = max_c1.squeeze(1) + sumexp_c.log()
        loss_t[rows] = torch.where(valid_c, lse_c - tgt_logit_c, 0.0)
        if not any_grad:
            del logits_cv, exp_cv  # before the next chunk's [c, V] buffer is allocated
            continue

        # d loss_i / d logits_i = softmax_i - onehot(target_i), times the row's scale (0 if ignored).
        scale_c = valid_c.to(cdtype)
        if row_scale_t is not None:
            scale_c = scale_c * row_scale_t[rows].to(cdtype)
        d_logits_cv = exp_cv.mul_((scale_c / sumexp_c)[:, None])
        d_logits_cv.scatter_add_(1, tgt_safe_c[:, None], -scale_c[:, None])

        if grad_h is not None:
            grad_h[rows] = (d_logits_cv @ w_vh).to(grad_h.dtype)
        if grad_w is not None:
            # In place, like grad_w.addmm_; the out= form is also visible to FlopCounterMode.
            torch.addmm(grad_w, d_logits_cv.T, h_ch, out=grad_w)
        if grad_b is not None:
            grad_b += d_logits_cv.sum(0)
        # logits_cv, exp_cv and d_logits_cv share one [c, V] buffer: free it before the next
        # chunk's matmul allocates another (else two chunks of logits are live at once)
        del logits_cv, exp_cv, d_logits_cv

    return loss_t, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden_th, weight_vh, bias_v, targets_t, ignore_index, chunk_rows, reduction, grads_wanted
    ):
        ctx.ignore_index, ctx.chunk_rows, ctx.reduction = ignore_index, chunk_rows, reduction
        ctx.input_dtypes = (hidden_th.dtype, weight_vh.dtype, None if bias_v is None else bias_v.dtype)
        # (hidden, weight, bias); needs_input_grad is set even under no_grad, hence grads_wanted.
        ctx.need = need = tuple(grads_wanted and n for n in ctx.needs_input_grad[:3])
        with _autocast_off(hidden_th.device):
            if reduction == "sum":
                loss_t, grad_h, grad_w, grad_b = _chunk_loop(
                    hidden_th, weight_vh, bias_v, targets_t, ignore_index, chunk_rows, None, need
                )
                # Gradients for a scalar upstream grad of 1; backward only rescales them.
                ctx.save_for_backward(grad_h, grad_w, grad_b)
                return loss_t.sum()
            loss_t, *_ = _chunk_loop(
                hidden_th, weight_vh, bias_v, targets_t, ignore_index, chunk_rows, None, (False,) * 3
            )
            ctx.save_for_backward(hidden_th, weight_vh, bias_v, targets_t)
            return loss_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h_dtype, w_dtype, b_dtype = ctx.input_dtypes
        if ctx.reduction == "sum":
            grad_h, grad_w, grad_b = ctx.saved_tensors
            # Out of place: a retained graph may run backward twice.
            if grad_h is not None:
                grad_h = (grad_h * grad_out).to(h_dtype)
            if grad_w is not None:
                grad_w = (grad_w * grad_out).to(w_dtype)
            if grad_b is not None:
                grad_b = (grad_b * grad_out).to(b_dtype)
        else:
            hidden_th, weight_vh, bias_v, targets_t = ctx.saved_tensors
            with _autocast_off(hidden_th.device):
                _, grad_h, grad_w, grad_b = _chunk_loop(
                    hidden_th,
                    weight_vh,
                    bias_v,
                    targets_t,
                    ctx.ignore_index,
                    ctx.chunk_rows,
                    grad_out,
                    ctx.need,
                )
            grad_w = None if grad_w is None else grad_w.to(w_dtype)
            grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None

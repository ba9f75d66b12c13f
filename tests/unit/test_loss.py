"""Chunked linear + cross-entropy == full-logits `F.cross_entropy` (value and every gradient).

Tolerances: fp64 relative error <= 1e-12 (only summation order differs); fp32 <= 1e-5; bf16
inputs: loss <= 1e-5 against the fp32 reference on the same (upcast) values, since the chunk
math runs in fp32, and gradients <= 1e-2, since they are returned rounded to bf16 (2^-8).
Relative error is max|a - b| / max|b| over the whole tensor.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from longtrain.trainer.model.loss import cross_entropy_reference, linear_cross_entropy

T, H, V = 37, 16, 50
IGNORE = -100


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def _make(dtype, t=T, h=H, v=V, bias=True, ignore_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    bias_v = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (t,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hidden, weight, bias_v, targets


def _loss_and_grads(fn, hidden, weight, bias_v, targets, reduction, **kw):
    """Loss and grads of sum(loss * g) for a fixed random upstream g (exercises the grad_output path)."""
    loss = fn(hidden, weight, targets, bias_v, reduction=reduction, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [x for x in (hidden, weight, bias_v) if x is not None and x.requires_grad]
    grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), inputs, allow_unused=True)
    return loss.detach(), grads


def _chunked(chunk_rows):
    def fn(hidden, weight, targets, bias_v, reduction):
        return linear_cross_entropy(
            hidden, weight, targets, bias_v=bias_v, chunk_rows=chunk_rows, reduction=reduction
        )

    return fn


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_rows", [8, 16, 37, 100])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(dtype, tol, chunk_rows, reduction, bias):
    hidden, weight, bias_v, targets = _make(dtype, bias=bias)
    loss, grads = _loss_and_grads(_chunked(chunk_rows), hidden, weight, bias_v, targets, reduction)
    ref_loss, ref_grads = _loss_and_grads(cross_entropy_reference, hidden, weight, bias_v, targets, reduction)
    assert loss.shape == ref_loss.shape and loss.dtype == dtype
    assert _rel_err(loss, ref_loss) <= tol
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == ref.dtype and g.shape == ref.shape
        assert _rel_err(g, ref) <= tol


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_frozen_input(frozen, reduction):
    hidden, weight, bias_v, targets = _make(torch.float64)
    (weight if frozen == "weight" else hidden).requires_grad_(False)
    loss, grads = _loss_and_grads(_chunked(8), hidden, weight, bias_v, targets, reduction)
    ref_loss, ref_grads = _loss_and_grads(cross_entropy_reference, hidden, weight, bias_v, targets, reduction)
    assert _rel_err(loss, ref_loss) <= 1e-12
    assert len(grads) == 2
    for g, ref in zip(grads, ref_grads, strict=True):
        assert _rel_err(g, ref) <= 1e-12


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_ignored_and_empty(reduction):
    hidden, weight, bias_v, targets = _make(torch.float32)
    targets.fill_(IGNORE)
    loss = linear_cross_entropy(hidden, weight, targets, bias_v=bias_v, chunk_rows=8, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0)
    for x in (hidden, weight, bias_v):
        assert torch.all(x.grad == 0)

    hidden, weight, bias_v, targets = _make(torch.float32, t=0)
    loss = linear_cross_entropy(hidden, weight, targets, bias_v=bias_v, chunk_rows=8, reduction=reduction)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert hidden.grad.shape == (0, H) and torch.all(weight.grad == 0) and torch.all(bias_v.grad == 0)


def test_bf16_inputs_under_autocast():
    hidden, weight, bias_v, targets = _make(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(_chunked(16), hidden, weight, bias_v, targets, "sum")
    # Oracle: the same bf16 values, upcast, in fp32 without autocast.
    up = [x.detach().float().requires_grad_() for x in (hidden, weight, bias_v)]
    ref_loss, ref_grads = _loss_and_grads(cross_entropy_reference, *up, targets, "sum")
    assert loss.dtype == torch.float32
    assert _rel_err(loss, ref_loss) <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16
        assert _rel_err(g, ref) <= 1e-2


def test_fp32_inputs_ignore_autocast():
    """Under a bf16 autocast the chunk matmuls still run in fp32 (autocast is switched off inside)."""
    hidden, weight, bias_v, targets = _make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(_chunked(16), hidden, weight, bias_v, targets, "none")
    ref_loss, ref_grads = _loss_and_grads(cross_entropy_reference, hidden, weight, bias_v, targets, "none")
    assert loss.dtype == torch.float32
    assert _rel_err(loss, ref_loss) <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32 and _rel_err(g, ref) <= 1e-5


def test_retained_graph_backward_twice():
    hidden, weight, bias_v, targets = _make(torch.float64)
    loss = linear_cross_entropy(hidden, weight, targets, bias_v=bias_v, chunk_rows=8)
    (0.5 * loss).backward(retain_graph=True)
    first = [x.grad.clone() for x in (hidden, weight, bias_v)]
    (0.5 * loss).backward()
    for x, g in zip((hidden, weight, bias_v), first, strict=True):
        assert torch.allclose(x.grad, 2 * g, rtol=1e-14, atol=0)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_never_allocates_full_logits(reduction):
    t, h, v, chunk = 64, 8, 50, 16  # [t, h] and [V, h] are both smaller than one chunk [chunk, V]
    hidden, weight, bias_v, targets = _make(torch.float32, t=t, h=h, v=v)
    with _MaxNumel() as mode:
        loss = linear_cross_entropy(
            hidden, weight, targets, bias_v=bias_v, chunk_rows=chunk, reduction=reduction
        )
        loss.sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    assert mode.max_numel <= chunk * v < t * v

    with _MaxNumel() as mode:  # the detector does see the reference's full logits
        cross_entropy_reference(hidden, weight, targets, bias_v, reduction=reduction).sum().backward()
    assert mode.max_numel >= t * v


def test_flops_sum_computes_grads_in_forward_only_when_needed():
    """reduction="sum": 3 matmuls with grads (as unfused), 1 under no_grad; "none" recomputes: 4."""
    t, h, v = 64, 16, 50
    matmul = 2 * t * h * v
    hidden, weight, _, targets = _make(torch.float32, t=t, h=h, v=v, bias=False)
    counts = {}
    for name, reduction, grad in [("sum", "sum", True), ("none", "none", True), ("eval", "sum", False)]:
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, reduction=reduction)
            if grad:
                loss.sum().backward()
        counts[name] = counter.get_total_flops()
    assert counts == {"sum": 3 * matmul, "none": 4 * matmul, "eval": matmul}


def test_bad_arguments():
    hidden, weight, _, targets = _make(torch.float32, bias=False)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="mean")
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_one_chunk_of_logits_live_at_a_time(reduction):
    """The [chunk, V] buffer of a chunk is freed before the next chunk's matmul allocates its own:
    the peak of the forward (which also computes the gradients for "sum") does not grow with the
    number of chunks. Counted by the device-bytes counter, with a vocabulary large enough that one
    chunk of logits (4 MiB) dwarfs everything else."""
    from longtrain.offload.memory import DeviceBytesCounter

    h, v, chunk = 16, 8192, 128
    peaks = []
    for t in (chunk, 4 * chunk):
        hidden, weight, bias_v, targets = _make(torch.float32, t=t, h=h, v=v)
        for _ in range(2):  # the first run warms the counter's dispatch machinery
            with DeviceBytesCounter("cpu") as counter:
                linear_cross_entropy(
                    hidden, weight, targets, bias_v=bias_v, chunk_rows=chunk, reduction=reduction
                )
        peaks.append(counter.peak_bytes)
    one_chunk = chunk * v * 4
    assert peaks[0] >= one_chunk  # the counter sees the chunk
    assert peaks[1] < peaks[0] + 0.5 * one_chunk, (peaks, one_chunk)

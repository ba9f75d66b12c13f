"""The CPU flash core under GQA without repeated k/v copies (trainer/model/attention.py).

Oracle: the same aten kernel called on k/v repeated to every query head (the old path) must give
the same floats (each head is computed on its own, so the results are bit-equal), and the plain
math reference within float64 rounding. Memory: the device-bytes counter during one backward.
"""

from __future__ import annotations

import gc

import pytest
import torch

from longtrain.offload.memory import DeviceBytesCounter
from longtrain.trainer.model.attention import (
    CpuFlashAttention,
    DocSpans,
    ReferenceAttention,
    _bhsd,
    _expand_kv,
    _fold_kv_grad,
    _tnd,
)


def qkv(t: int, n: int, n_kv: int, d: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, dtype=dtype, generator=g) for h in (n, n_kv, n_kv)]


def repeated_kv_kernel(q, k, v, dout, scale):
    """The old path: k/v repeated to n heads, one kernel call, the kv gradients folded."""
    n, n_kv = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, n), _expand_kv(v, n)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(ke), _bhsd(ve), 0.0, True, scale=scale
    )
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout).contiguous(), _bhsd(q), _bhsd(ke), _bhsd(ve), o, lse, 0.0, True, scale=scale
    )
    return _tnd(o), lse.squeeze(0), _tnd(dq), _fold_kv_grad(_tnd(dk), n_kv), _fold_kv_grad(_tnd(dv), n_kv)


@pytest.mark.parametrize("n, n_kv", [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_kernel_calls_equal_repeated_kv(n, n_kv, dtype):
    t, d, scale = 160, 16, 0.25
    q, k, v = qkv(t, n, n_kv, d, dtype)
    dout = torch.randn(t, n, d, dtype=dtype, generator=torch.Generator().manual_seed(7))
    core, docs = CpuFlashAttention(), DocSpans((0, t))
    out, lse = core.forward(q, k, v, docs, scale)
    dq, dk, dv = core.backward(dout, q, k, v, out, lse, docs, scale)
    ref = repeated_kv_kernel(q, k, v, dout, scale)
    for name, got, want in zip(("out", "lse", "dq"), (out, lse, dq), ref[:3], strict=True):
        assert torch.equal(got, want), name
    # the group sums add g values per element in the same order as the fold of the repeated path
    assert torch.equal(dk, ref[3]) and torch.equal(dv, ref[4])
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("n, n_kv", [(4, 2), (4, 4)])
def test_packed_documents_match_reference_math(n, n_kv):
    t, d, scale = 96, 8, 0.3
    q, k, v = qkv(t, n, n_kv, d)
    dout = torch.randn(t, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    docs = DocSpans((0, 17, 17, 64, 96))  # an empty document too
    got = CpuFlashAttention().forward(q, k, v, docs, scale)
    want = ReferenceAttention().forward(q, k, v, docs, scale)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g_got = CpuFlashAttention().backward(dout, q, k, v, *got, docs, scale)
    g_want = ReferenceAttention().backward(dout, q, k, v, *want, docs, scale)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_holds_no_repeated_kv_or_result_copies():
    """One document, 8 query heads over 2 kv heads: the backward's transient is dq + dk + dv (1.5
    [t, n*d] tensors) plus one group's kernel results (dq, dk, dv of 4 heads: 1.5), not the
    repeated k/v (2), the contiguous dout (1), the kernel's results for all heads (3) and their
    folds (0.5) of the old path."""
    t, n, n_kv, d = 4096, 8, 2, 32
    q, k, v = qkv(t, n, n_kv, d, torch.float32)
    dout = torch.randn(t, n, d)
    docs = DocSpans((0, t))
    core = CpuFlashAttention()
    out, lse = core.forward(q, k, v, docs, 0.2)
    # the kernel's first call allocates per-thread scratch it keeps, and the counter's first use
    # ~25 MB of dispatch machinery: warm both
    with DeviceBytesCounter("cpu"):
        core.backward(dout, q, k, v, out, lse, docs, 0.2)
        repeated_kv_kernel(q, k, v, dout, 0.2)
    gc.collect()
    one = t * n * d * 4  # bytes of one [t, n, d] float32 tensor
    with DeviceBytesCounter("cpu") as counter:
        grads = core.backward(dout, q, k, v, out, lse, docs, 0.2)
    del grads
    assert counter.peak_bytes < 3.25 * one, counter.peak_bytes / one
    with DeviceBytesCounter("cpu") as old:
        ref = repeated_kv_kernel(q, k, v, dout, 0.2)
    del ref
    assert old.peak_bytes > 6 * one, old.peak_bytes / one  # the counter sees the copies it should

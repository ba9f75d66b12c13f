"""Triton fused linear + cross-entropy == the chunked torch `linear_cross_entropy`.

On CPU the kernels run under the Triton interpreter. TRITON_INTERPRET is read when `@triton.jit`
decorates a kernel, i.e. when `loss_triton` is first imported, so the interpreted cases run in a
fresh subprocess (this file run as a script) with the variable set; the subprocess also reports
that its kernels really are interpreted. This keeps the setting out of the pytest process, where
other tests may import triton for real.

Tolerances (relative error = max|a - b| / max|b|): fp32 1e-5 (only the summation order differs);
bf16 inputs: loss 1e-5 (fp32 accumulation in both), grads 2e-2 (the Triton path rounds the
d_logits tile to bf16 before its matmuls, the torch path keeps it in fp32, and both round the
returned gradient to bf16).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from longtrain.trainer.model.loss import linear_cross_entropy  # noqa: E402
from longtrain.trainer.model.loss_triton import (  # noqa: E402
    fused_linear_cross_entropy,
    triton_available,
    triton_linear_cross_entropy,
)

IGNORE = -100
SMALL_BLOCKS = {"block_t": 16, "block_v": 32, "block_h": 16}  # t=33, V=100, h=40 divide none of them

# name -> (dtype, t, h, V, bias, reduction, frozen input or None, all targets ignored)
CASES = {
    "fp32_sum": ("float32", 33, 40, 100, False, "sum", None, False),
    "fp32_sum_bias": ("float32", 33, 40, 100, True, "sum", None, False),
    "fp32_none": ("float32", 33, 40, 100, False, "none", None, False),
    "fp32_none_bias": ("float32", 33, 40, 100, True, "none", None, False),
    "fp32_frozen_weight": ("float32", 33, 40, 100, True, "sum", "weight", False),
    "fp32_frozen_hidden": ("float32", 33, 40, 100, True, "sum", "hidden", False),
    "fp32_all_ignored": ("float32", 33, 40, 100, True, "sum", None, True),
    "fp32_empty": ("float32", 0, 40, 100, True, "sum", None, False),
    "bf16_sum": ("bfloat16", 33, 40, 100, False, "sum", None, False),
}
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-5, 2e-2)}  # (loss, grads)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return diff / (scale if scale > 0 else 1.0)


def _inputs(dtype, t, h, v, bias, frozen, all_ignored, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype)
    bias_v = torch.randn(v, generator=gen).to(device, dtype) if bias else None
    targets = torch.randint(0, v, (t,), generator=gen)
    targets[:: 1 if all_ignored else 4] = IGNORE
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias_v)):
        if x is not None and name != frozen:
            x.requires_grad_()
    return hidden, weight, bias_v, targets.to(device)


def _compare(loss_fn, dtype, t, h, v, bias, reduction, frozen, all_ignored, device="cpu", **kw):
    """Relative errors of loss_fn against the torch op: {"loss": e, "grad_hidden": e, ...}."""
    hidden, weight, bias_v, targets = _inputs(
        getattr(torch, dtype), t, h, v, bias, frozen, all_ignored, device
    )
    named = {"grad_hidden": hidden, "grad_weight": weight, "grad_bias": bias_v}
    named = {k: x for k, x in named.items() if x is not None and x.requires_grad}
    results = []
    for fn in (loss_fn, linear_cross_entropy):
        loss = fn(
            hidden, weight, targets, bias_v=bias_v, reduction=reduction, **(kw if fn is loss_fn else {})
        )
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(device)
        grads = torch.autograd.grad((loss * upstream).sum(), list(named.values()))
        results.append((loss, dict(zip(named, grads, strict=True))))
    (loss, grads), (ref_loss, ref_grads) = results
    assert loss.shape == ref_loss.shape and loss.dtype == torch.float32
    errs = {"loss": _rel_err(loss, ref_loss)}
    for k, g in grads.items():
        assert g.dtype == ref_grads[k].dtype and g.shape == ref_grads[k].shape, k
        errs[k] = _rel_err(g, ref_grads[k])
    return errs


def _interpreted_main():
    """Subprocess entry point: run every case under the interpreter, print one JSON line."""
    from triton.runtime.interpreter import InterpretedFunction

    from longtrain.trainer.model import loss_triton

    out = {"interpreted": isinstance(loss_triton._fwd_kernel, InterpretedFunction), "cases": {}}
    for name, case in CASES.items():
        out["cases"][name] = _compare(triton_linear_cross_entropy, *case, **SMALL_BLOCKS)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_took_effect(interpreted):
    assert interpreted["interpreted"]


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_torch_under_interpreter(interpreted, name):
    loss_tol, grad_tol = TOL[CASES[name][0]]
    errs = interpreted["cases"][name]
    frozen = CASES[name][6]
    expected = {"grad_hidden", "grad_weight"} - {f"grad_{frozen}"} | (
        {"grad_bias"} if CASES[name][4] else set()
    )
    assert set(errs) == {"loss"} | expected
    assert errs["loss"] <= loss_tol, errs
    for k in expected:
        assert errs[k] <= grad_tol, (k, errs)


def test_dispatcher_falls_back_to_torch_on_cpu():
    assert not triton_available("cpu")
    hidden, weight, bias_v, targets = _inputs(torch.float32, 33, 40, 100, True, None, False)
    for reduction in ("sum", "none"):
        got = fused_linear_cross_entropy(
            hidden, weight, targets, bias_v=bias_v, reduction=reduction, chunk_rows=8
        )
        want = linear_cross_entropy(hidden, weight, targets, bias_v=bias_v, reduction=reduction, chunk_rows=8)
        assert torch.equal(got, want)


def test_bad_blocks():
    hidden, weight, _, targets = _inputs(torch.float32, 8, 16, 20, False, None, False)
    with pytest.raises(ValueError, match="block_v"):
        triton_linear_cross_entropy(hidden, weight, targets, block_v=48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kernels_match_torch_on_gpu(dtype, reduction):
    assert triton_available("cuda")
    loss_tol, grad_tol = TOL[dtype]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # ieee fp32 in both paths
    try:
        errs = _compare(
            fused_linear_cross_entropy, dtype, 1000, 256, 5003, True, reduction, None, False, "cuda"
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert errs["loss"] <= loss_tol, errs
    assert all(errs[k] <= grad_tol for k in errs if k != "loss"), errs


if __name__ == "__main__":
    _interpreted_main()

"""CUDA-only checks of the paths CPU machines cannot run: streams + rounding buffers + pinned
host buffers of the copy engine, token-wise swap/recompute on the device, the flash-attn and SDPA
attention cores, and the Triton loss inside the model. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from longtrain.offload import activation_stats, apply_activation_memory
from longtrain.offload.copy_engine import CudaCopyEngine
from longtrain.offload.store import HostStore
from longtrain.trainer.model.adapter import adapt
from longtrain.trainer.model.attention import DocSpans, ReferenceAttention, attention, build_attention_backend

pytestmark = pytest.mark.gpu


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_copy_engine_round_trip_on_streams():
    store = HostStore()
    engine = CudaCopyEngine(store, torch.device("cuda"))
    src = torch.randn(1000, 64, device="cuda")
    engine.wait(engine.offload(("l0", "x"), src, layer=0))
    assert store.read(("l0", "x"), torch.device("cpu")).is_pinned()  # on CPU, read gives the host buffer
    back = engine.wait(engine.fetch(("l0", "x")))
    torch.cuda.synchronize()
    assert back.is_cuda and torch.equal(back, src)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_tokenwise_on_cuda_equals_plain(make_tiny_model, alpha):
    hf = make_tiny_model("llama", dtype=torch.float32, num_layers=4).cuda()
    model = adapt(hf, "sdpa")
    ids = torch.randint(0, hf.config.vocab_size, (2, 96), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    apply_activation_memory(model, {"mode": "tokenwise", "alpha": alpha, "keep_last": 1})
    model(input_ids=ids, labels=ids).loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6)
    assert activation_stats(model)["host_bytes"] > 0


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_cuda_attention_cores_match_reference(backend):
    """Forward (out, lse) and backward (dq, dk, dv through the core's own backward) in bf16 against
    the reference core in float32."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    core = build_attention_backend(backend, "cuda")
    docs = DocSpans((0, 40, 41, 100))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(100, h, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for h in (4, 2, 2)
    )
    dout = torch.randn(100, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = attention(q, k, v, docs, core)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_qkv = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention(*ref_qkv, docs, ReferenceAttention())
    ref_grads = torch.autograd.grad(ref_out, ref_qkv, dout.float())
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.float(), ref_lse, rtol=1e-2, atol=1e-2)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.shape == want.shape and got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2, msg=f"d{name}")

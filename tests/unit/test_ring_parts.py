"""The single-process parts of ring attention and Ulysses: zigzag layout, block kernels, the
logsumexp merge, and the ring schedule emulated in one process against ``attention()``."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.config_checks import ConfigError
from longtrain.parallel.blocks import CpuFlashBlocks, MathBlocks, build_block_kernel
from longtrain.parallel.ring import _Block, merge_partial
from longtrain.parallel.ulysses import ContiguousLayout, check_ulysses
from longtrain.parallel.zigzag import ZigzagLayout
from longtrain.trainer.model.attention import DocSpans, ReferenceAttention, attention

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _docs(lengths):
    cu = [0]
    for s in lengths:
        cu.append(cu[-1] + s)
    return DocSpans(tuple(cu))


def test_zigzag_assigns_chunks_i_and_2n_minus_1_minus_i():
    layout = ZigzagLayout.build(_docs([16]), 4)  # 8 chunks of 2
    assert layout.chunks == (2,) and layout.local_len == 4
    for pos in range(4):
        assert layout.global_index(pos).tolist() == [2 * pos, 2 * pos + 1, 2 * (7 - pos), 2 * (7 - pos) + 1]
        assert layout.positions(pos).tolist() == layout.global_index(pos).tolist()


def test_zigzag_pads_inside_and_round_trips():
    docs = _docs([10, 3, 7])
    layout = ZigzagLayout.build(docs, 2)
    assert layout.chunks == (3, 1, 2) and layout.local_len == 12
    assert layout.local_docs.cu_seqlens == (0, 6, 8, 12)
    assert layout.global_index(0).tolist() == [0, 1, 2, 9, -1, -1, 10, -1, 13, 14, 19, -1]
    assert layout.positions(0).tolist() == [0, 1, 2, 9, 10, 11, 0, 3, 0, 1, 6, 7]
    x = torch.arange(20.0).view(20, 1) + 1
    shards = [layout.shard(x, p) for p in range(2)]
    assert all(s.shape == (12, 1) for s in shards)
    assert torch.equal(shards[0][~layout.valid(0)], torch.zeros(4, 1))
    assert torch.equal(layout.unshard(shards), x)
    lse = torch.randn(3, 20)
    assert torch.equal(layout.unshard([layout.shard(lse, p, dim=1) for p in range(2)], dim=1), lse)
    # every real row appears exactly once over the ring
    rows = torch.cat([layout.global_index(p) for p in range(2)])
    assert sorted(rows[rows >= 0].tolist()) == list(range(20))


def test_zigzag_short_document_leaves_ranks_with_padding_only():
    layout = ZigzagLayout.build(_docs([2]), 4)
    assert [int(layout.valid(p).sum()) for p in range(4)] == [1, 1, 0, 0]


def test_merge_keeps_empty_rows_zero_not_nan():
    acc_out, acc_lse = torch.zeros(3, 2, 4), torch.full((2, 3), float("-inf"))
    out, lse = torch.randn(3, 2, 4), torch.full((2, 3), float("-inf"))
    lse[:, 0] = 0.5
    merge_partial(acc_out, acc_lse, out, lse)
    assert torch.isfinite(acc_out).all()
    assert torch.equal(acc_out[1:], torch.zeros(2, 2, 4)) and torch.isinf(acc_lse[:, 1:]).all()
    assert torch.allclose(acc_out[0], out[0]) and torch.allclose(acc_lse[:, 0], lse[:, 0])


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_flash_blocks_match_math_blocks(causal):
    g = torch.Generator().manual_seed(0)
    lq = (5, 9) if causal else (4, 7)
    lk = lq if causal else (6, 3)
    q = torch.randn(sum(lq), 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = (0, lq[0], sum(lq)), (0, lk[0], sum(lk))
    ref, fast = MathBlocks(), CpuFlashBlocks()
    o1, l1 = ref.forward(q, k, v, cu_q, cu_k, causal, 0.3)
    o2, l2 = fast.forward(q, k, v, cu_q, cu_k, causal, 0.3)
    assert (o1 - o2).abs().max() < 1e-12 and (l1 - l2).abs().max() < 1e-12
    dout = torch.randn_like(q)
    for a, b in zip(
        ref.backward(dout, q, k, v, o1, l1, cu_q, cu_k, causal, 0.3),
        fast.backward(dout, q, k, v, o1, l1, cu_q, cu_k, causal, 0.3),
        strict=True,
    ):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12


def test_build_block_kernel_names():
    assert build_block_kernel("reference").name == "math"
    assert build_block_kernel("cpu_flash").name == "cpu_flash"
    with pytest.raises(ValueError, match="block kernel"):
        build_block_kernel("nope")


@pytest.mark.parametrize(
    "n,dtype", [(1, "float64"), (2, "float64"), (3, "float64"), (4, "float64"), (3, "bfloat16")]
)
def test_ring_schedule_emulated_in_one_process(n, dtype):
    """Every (rank, step) block of the ring, merged and back-propagated as RingAttention does,
    equals single-process attention on the whole documents (fp64 to 1e-12; bf16 inputs, merged in
    fp32, against the fp64 oracle to 3e-2, measured 1.6e-2): the schedule itself, without
    communication (the gloo tests cover that)."""
    lengths = [23, 4, 40, 1]
    docs = _docs(lengths)
    g = torch.Generator().manual_seed(n)
    q = torch.randn(docs.cu_seqlens[-1], 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(docs.cu_seqlens[-1], 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn_like(q)
    scale = 1 / math.sqrt(8)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = attention(*qkv, docs, ReferenceAttention(), scale)
    o_ref.backward(dout)

    layout = ZigzagLayout.build(docs, n)
    kernel = CpuFlashBlocks()
    low = getattr(torch, dtype)
    acc = torch.promote_types(low, torch.float32)
    tol = 1e-12 if low == torch.float64 else 3e-2
    local = {
        name: [layout.shard(x.to(low), p) for p in range(n)]
        for name, x in zip("qkvd", (q, k, v, dout), strict=True)
    }
    outs, lses, dqs = [], [], []
    dks = [torch.zeros(x.shape, dtype=acc) for x in local["k"]]
    dvs = [torch.zeros(x.shape, dtype=acc) for x in local["v"]]
    for p in range(n):
        acc_o = torch.zeros(local["q"][p].shape, dtype=acc)
        acc_l = torch.full((4, layout.local_len), float("-inf"), dtype=acc)
        for step in range(n):
            blk = _Block(layout, p, (p - step) % n)
            src = (p - step) % n
            qq = torch.cat([local["q"][p][a:b] for a, b in blk.q_spans])
            kk = torch.cat([local["k"][src][a:b] for a, b in blk.k_spans])
            vv = torch.cat([local["v"][src][a:b] for a, b in blk.k_spans])
            o, lse = kernel.forward(qq, kk, vv, blk.cu_q, blk.cu_k, blk.causal, scale)
            for (a, b), c0 in zip(blk.q_spans, blk.cu_q, strict=False):
                merge_partial(acc_o[a:b], acc_l[:, a:b], o[c0 : c0 + b - a], lse[:, c0 : c0 + b - a])
        outs.append(acc_o.to(low))
        lses.append(acc_l)
    for p in range(n):
        dq = torch.zeros(local["q"][p].shape, dtype=acc)
        for step in range(n):
            src = (p - step) % n
            blk = _Block(layout, p, src)
            take = lambda x, spans: torch.cat([x[a:b] for a, b in spans])  # noqa: E731
            gq, gk, gv = kernel.backward(
                take(local["d"][p], blk.q_spans),
                take(local["q"][p], blk.q_spans),
                take(local["k"][src], blk.k_spans),
                take(local["v"][src], blk.k_spans),
                take(outs[p], blk.q_spans),
                torch.cat([lses[p][:, a:b] for a, b in blk.q_spans], 1),
                blk.cu_q,
                blk.cu_k,
                blk.causal,
                scale,
            )
            blk.scatter(dq, gq)
            for (a, b), c0 in zip(blk.k_spans, blk.cu_k, strict=False):
                dks[src][a:b] += gk[c0 : c0 + b - a]
                dvs[src][a:b] += gv[c0 : c0 + b - a]
        dqs.append(dq)
    valid = [layout.valid(p) for p in range(n)]
    assert (layout.unshard(outs).double() - o_ref.detach()).abs().max() < tol
    lse_masked = [torch.where(valid[p], lses[p], 0.0) for p in range(n)]
    assert (layout.unshard(lse_masked, dim=1).double() - lse_ref).abs().max() < tol
    for mine, ref in ((dqs, qkv[0].grad), (dks, qkv[1].grad), (dvs, qkv[2].grad)):
        assert (layout.unshard(mine).double() - ref).abs().max() < tol


def test_ulysses_needs_degree_dividing_kv_heads():
    check_ulysses(8, 4, 4)
    with pytest.raises(ConfigError, match=r"parallel.cp_impl=ulysses .*num_kv_heads \(2\)") as e:
        check_ulysses(8, 2, 4)
    assert "\n" not in str(e.value)


def test_contiguous_layout_pads_the_end():
    layout = ContiguousLayout((0, 5, 11), 4)
    assert layout.local_len == 3
    assert layout.global_index(3).tolist() == [9, 10, -1]
    assert layout.positions(1).tolist() == [3, 4, 0]
    x = torch.randn(11, 2)
    assert torch.equal(layout.unshard([layout.shard(x, p) for p in range(4)]), x)

"""Tiled row-wise compute (``activation.tile_rows``, offload/tiles.py).

Oracle: the plain model (mode none). With tiles, weight gradients are sums over tiles instead of
one matmul, so they are not bit-equal: float64 within 1e-10 relative (to the largest element of
each gradient) is the contract; bf16 autocast within the tolerance of a bf16 sum reordering.
Memory: the device-bytes counter (offload/memory.py, glibc bytes in use sampled after every op)
over one forward + backward; the tile's transient must scale with tile_rows, not with seq.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from saved_bytes import dims, skeletal_bytes_per_token
from tiny import tiny_adapted_model

from longtrain.config_checks import ConfigError
from longtrain.offload import (
    ActivationPlan,
    LayerPlan,
    activation_stats,
    apply_activation_memory,
    cost,
)
from longtrain.offload.memory import DeviceBytesCounter
from longtrain.offload.tiles import AUTO_MIN_ROWS, resolve_tile_rows, tile_bounds
from longtrain.offload.tokenwise import TokenwiseExecutor

VOCAB = 101
RTOL = 1e-10

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def ids_and_positions(b, s, packed=False, seed=1):
    ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    if not packed:
        return ids, None
    pos = torch.zeros(b, s, dtype=torch.long)  # documents restart mid-row (2 and 3 per row)
    for r, cuts in zip(range(b), ([0, s // 2 + 1], [0, 5, s - 7]), strict=False):
        bounds = cuts + [s]
        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
            pos[r, s0:s1] = torch.arange(s1 - s0)
    return ids, pos


def run(model, activation, ids, pos=None, autocast=False, normalizer=None):
    """(loss, {name: grad}, stats) of one forward + backward with ``activation`` installed."""
    apply_activation_memory(model, activation)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=ids, position_ids=pos, loss_normalizer=normalizer)
    out.loss.backward()
    stats = activation_stats(model)
    model.layer_executor.close()
    return out.loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def assert_close(got, ref, label, rtol=RTOL):
    (loss, grads), (ref_loss, ref_grads) = got[:2], ref[:2]
    assert abs(loss.item() - ref_loss.item()) <= rtol * abs(ref_loss.item()), (label, loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = ((grads[name] - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
        assert err <= rtol, f"{label}: grad of {name} off by {err:.2e} (relative to its largest element)"


# ------------------------------------------------------------------------------------ boundaries


def test_tile_bounds_cover_the_rows_on_aligned_boundaries_and_the_cut():
    assert tile_bounds(100, 0) == [(0, 100)]
    assert tile_bounds(100, 0, cut=40) == [(0, 40), (40, 100)]
    assert tile_bounds(100, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert tile_bounds(100, 32, cut=40) == [(0, 32), (32, 40), (40, 64), (64, 96), (96, 100)]
    assert tile_bounds(100, 32, cut=100) == tile_bounds(100, 32)  # alpha 1: no cut
    for t, rows, cut in [(1000, 64, 328), (77, 8, 16), (4096, 256, 0)]:
        bounds = tile_bounds(t, rows, cut)
        assert bounds[0][0] == 0 and bounds[-1][1] == t
        assert all(e0 == s1 for (_, e0), (s1, _) in zip(bounds, bounds[1:], strict=False))
        assert all(s % cost.ROW_ALIGN == 0 for s, _ in bounds)  # on the BLAS row tile


def test_resolve_tile_rows():
    assert resolve_tile_rows(0, 4096, 512, 1792) == 0
    assert resolve_tile_rows(100, 4096, 512, 1792) == 96  # down to a multiple of ROW_ALIGN
    assert resolve_tile_rows(3, 4096, 512, 1792) == cost.ROW_ALIGN
    assert resolve_tile_rows(4096, 4096, 512, 1792) == 0  # one tile: untiled
    # auto: tile x 4 intermediate tensors ~ seq x hidden, never under AUTO_MIN_ROWS rows
    assert resolve_tile_rows("auto", 65536, 512, 1792) == (65536 * 512 // (4 * 1792)) // 8 * 8
    assert resolve_tile_rows("auto", 2048, 512, 1792) == AUTO_MIN_ROWS
    assert resolve_tile_rows("auto", 200, 512, 1792) == 0


# ------------------------------------------------------------------------------------ correctness

CASES = {
    "tokenwise a0 host": {"mode": "tokenwise", "alpha": 0.0, "keep_last": 0},
    "tokenwise a0.37 host": {"mode": "tokenwise", "alpha": 0.37, "keep_last": 1},
    "tokenwise a1 host": {"mode": "tokenwise", "alpha": 1.0, "keep_last": 0},
    "tokenwise a0.37 file": {"mode": "tokenwise", "alpha": 0.37, "keep_last": 0, "tier": "file"},
    "tokenwise a1 file": {"mode": "tokenwise", "alpha": 1.0, "keep_last": 0, "tier": "file"},
    "recompute": {"mode": "recompute"},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tile_rows", [16, 40])  # t = 96: divides it, does not
def test_tiled_equals_plain_in_float64(tmp_path, case, tile_rows):
    model = tiny_adapted_model("llama", torch.float64, layers=3, vocab=VOCAB)
    ids, pos = ids_and_positions(2, 48, packed=True)
    ref = run(model, {"mode": "none"}, ids, pos)
    cfg = {**CASES[case], "tile_rows": tile_rows}
    if cfg.get("tier") == "file":
        cfg["file_dir"] = str(tmp_path)
    got = run(model, cfg, ids, pos)
    assert_close(got, ref, f"{case}, tile_rows {tile_rows}")
    untiled = run(
        model, CASES[case] | ({"file_dir": str(tmp_path)} if "tier" in CASES[case] else {}), ids, pos
    )
    assert torch.equal(got[0], untiled[0]), "the tiled forward computes the untiled floats"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiled_gqa_and_qkv_bias_with_unaligned_lengths(family):
    """GQA (4 query heads, 2 kv heads); qwen2's q/k/v biases; 2 x 37 rows (the cut and the tiles
    on multiples of 8 inside a length that is not)."""
    model = tiny_adapted_model(family, torch.float64, layers=2, vocab=VOCAB)
    ids, _ = ids_and_positions(2, 37)
    ref = run(model, {"mode": "none"}, ids)
    for alpha in (0.0, 0.5, 1.0):
        got = run(model, {"mode": "tokenwise", "alpha": alpha, "keep_last": 0, "tile_rows": 24}, ids)
        assert_close(got, ref, f"{family} alpha {alpha}")
    assert_close(run(model, {"mode": "recompute", "tile_rows": 24}, ids), ref, f"{family} recompute")


def test_tiled_gradient_accumulation_equals_plain():
    model = tiny_adapted_model("llama", torch.float64, layers=2, vocab=VOCAB)
    batches = [ids_and_positions(1, 64, seed=1)[0], ids_and_positions(2, 37, seed=2)[0]]
    total = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)

    def accumulate(activation):
        apply_activation_memory(model, activation)
        model.zero_grad(set_to_none=True)
        for ids in batches:
            model(input_ids=ids, labels=ids, loss_normalizer=total).loss.backward()
        model.layer_executor.close()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = accumulate({"mode": "none"})
    got = accumulate({"mode": "tokenwise", "alpha": 0.37, "keep_last": 0, "tile_rows": 16})
    for name, g in ref.items():
        assert ((got[name] - g).abs().max() / g.abs().max()).item() <= RTOL, name


def test_tiled_bf16_autocast_is_within_bf16_reordering():
    """bf16 autocast: the loss is the untiled loss (the forward computes the same rows); weight
    gradients sum tiles in another order: within 2% of each gradient's largest element, the
    same bound the untiled modes show against each other under a reordering."""
    model = tiny_adapted_model("llama", torch.float32, layers=2, vocab=VOCAB)
    ids, pos = ids_and_positions(2, 48, packed=True)
    ref = run(model, {"mode": "none"}, ids, pos, autocast=True)
    for cfg in (
        {"mode": "tokenwise", "alpha": 0.37, "keep_last": 0, "tile_rows": 16},
        {"mode": "recompute", "tile_rows": 16},
    ):
        got = run(model, cfg, ids, pos, autocast=True)
        assert torch.equal(got[0], ref[0]), cfg
        assert_close(got, ref, f"bf16 {cfg}", rtol=2e-2)


def test_mixed_plan_with_tiles_equals_plain_and_counts_bytes_per_layer(tmp_path):
    """Tiles change where rows are computed, not what is saved: each tokenwise layer still sends
    t * whole + a * rows bytes to its tier (head tiles' tensors plus q/k/v head rows)."""
    model = tiny_adapted_model("llama", torch.float64, layers=4, vocab=VOCAB)
    ids, _ = ids_and_positions(1, 96)
    t = 96
    layers = (
        LayerPlan("tokenwise", 0.3, "host", tile_rows=32),
        LayerPlan("recompute", tile_rows=24),
        LayerPlan("tokenwise", 0.77, "file", tile_rows="auto"),
        LayerPlan("tokenwise", 1.0, "host", tile_rows=40),
    )
    plan = ActivationPlan(layers, file_dir=str(tmp_path))
    got = run(model, plan, ids)
    assert_close(got, run(model, {"mode": "none"}, ids), "mixed plan with tiles")
    stats = got[2]
    whole, rows = skeletal_bytes_per_token(**dims(model))
    for i, layer in enumerate(layers):
        if layer.mode != "tokenwise":
            continue
        a = cost.split_row(layer.alpha, t)
        assert stats[f"layer{i}_{layer.tier}_bytes"] == t * whole + a * rows, i
        assert stats[f"layer{i}_recomputed_rows"] == t - a
    assert [stats[f"layer{i}_tile_rows"] for i in (0, 2, 3)] == [32, 0, 40]  # auto: 96 rows are one tile


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_no_tensor_survives_a_tiled_step(alpha):
    model = tiny_adapted_model("llama", torch.float32, layers=2, vocab=VOCAB)
    apply_activation_memory(model, {"mode": "tokenwise", "alpha": alpha, "keep_last": 0, "tile_rows": 16})
    ids, _ = ids_and_positions(1, 64)

    def live_after_step() -> int:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    live_after_step()
    counts = [live_after_step() for _ in range(3)]
    model.layer_executor.close()
    assert counts[0] == counts[1] == counts[2], counts


# ------------------------------------------------------------------------------------ memory


def peak_mib(model, t, activation):
    """Device bytes (MiB) at the peak of one forward + backward, after a warm-up step."""
    ids = torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(0))
    apply_activation_memory(model, activation)
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    with DeviceBytesCounter(torch.device("cpu")) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.layer_executor.close()
    return counter.peak_bytes / 2**20


@pytest.mark.fresh_heap
@pytest.mark.parametrize("mode", ["tokenwise", "recompute"])
def test_transient_peak_scales_with_tile_rows_not_seq(mode):
    """hidden 32, intermediate 2048: one layer's MLP intermediates dominate its transient. Untiled,
    the peak grows with seq x intermediate (4 saved seq x 2048 tensors plus their gradients); with
    64-row tiles it grows only with seq x hidden, and a larger tile raises it by about
    (tile rows x intermediate) x the few tensors one tile holds."""
    model = tiny_adapted_model("llama", torch.float32, layers=2, hidden=32, ffn=2048, vocab=VOCAB)
    base = {"mode": "tokenwise", "alpha": 0.0, "keep_last": 0} if mode == "tokenwise" else {"mode": mode}
    t = 2048
    untiled = [peak_mib(model, n, base) for n in (t, 2 * t)]
    tiled = [peak_mib(model, n, {**base, "tile_rows": 64}) for n in (t, 2 * t)]
    bigger_tile = peak_mib(model, t, {**base, "tile_rows": 256})
    seq_x_ffn = t * 2048 * 4 / 2**20  # one t x intermediate fp32 tensor: 16 MiB
    assert untiled[1] - untiled[0] > 4 * seq_x_ffn, untiled  # the wall tiles remove
    assert tiled[1] - tiled[0] < 0.5 * seq_x_ffn, tiled  # t more rows: no intermediate-sized growth
    assert tiled[0] < 0.2 * untiled[0], (tiled, untiled)
    tile_x_ffn = (256 - 64) * 2048 * 4 / 2**20  # 1.5 MiB per tensor of 192 more rows
    assert 2 * tile_x_ffn < bigger_tile - tiled[0] < 12 * tile_x_ffn, (bigger_tile, tiled[0])


@pytest.mark.fresh_heap
def test_layer_input_leaves_during_the_attention_backward(tmp_path, monkeypatch):
    """Once q, k, v are rebuilt, only the pre-attention backward reads the layer input again: the
    file tier drops it for the attention backward (the layer's peak) and reads it back once, which
    lowers the peak by exactly one [t, hidden] tensor; the host tier, read in place on a CPU
    device, keeps it (dropping the view would free nothing)."""
    t, hidden = 1024, 128
    model = tiny_adapted_model("llama", torch.float32, layers=2, hidden=hidden, ffn=2 * hidden, vocab=VOCAB)
    file_cfg = {"mode": "tokenwise", "alpha": 0.0, "keep_last": 0, "tile_rows": 64}
    file_cfg |= {"tier": "file", "file_dir": str(tmp_path)}
    evicted = peak_mib(model, t, file_cfg)
    file_stats = activation_stats(model)
    host_stats = run(model, {**file_cfg, "tier": "host"}, ids_and_positions(1, 256)[0])[2]
    monkeypatch.setattr(TokenwiseExecutor, "_evict_input", lambda self, rec: None)
    kept = peak_mib(model, t, file_cfg)
    x_mib = t * hidden * 4 / 2**20
    assert abs((kept - evicted) - x_mib) < 0.05 * x_mib, (kept, evicted, x_mib)
    assert [file_stats[f"layer{i}_input_rereads"] for i in (0, 1)] == [1, 1]
    assert [host_stats[f"layer{i}_input_rereads"] for i in (0, 1)] == [0, 0]


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            {"mode": "tokenwise", "tile_rows": -8},
            r"^activation\.tile_rows must be an int >= 0, got -8$",
        ),
        (
            {"mode": "tokenwise", "tile_rows": "max"},
            r"^activation\.tile_rows must be .* or 'auto', got 'max'$",
        ),
        ({"mode": "tokenwise", "tile_rows": True}, r"^activation\.tile_rows must be"),
        (
            {"mode": "none", "tile_rows": -1},
            r"^activation\.tile_rows must be an int >= 0",
        ),  # checked though unread
    ],
)
def test_bad_tile_rows_names_the_key_before_the_first_step(cfg, match):
    model = tiny_adapted_model("llama", torch.float32, layers=1, vocab=VOCAB)
    before = model.layer_executor
    with pytest.raises(ConfigError, match=match):
        apply_activation_memory(model, cfg)
    assert model.layer_executor is before

"""scripts/bench_length.py: the pieces the benchmark's numbers rest on.

The ALST peer must really be DeepSpeed's TiledMLP on every layer behind HF's checkpointing, and it
must compute the plain HF model's loss and gradients (fp32 tolerance: tiling and checkpointing
change the summation order, not the math); it must trim the heap exactly as often as our baselines;
the slope fit, the length search and the verdicts must say what the numbers say.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_common  # noqa: E402
import bench_length  # noqa: E402

from longtrain.offload import ActivationConfig, activation_stats, apply_activation_memory  # noqa: E402
from longtrain.offload.heap import heap_trim_available  # noqa: E402
from longtrain.trainer.model.adapter import adapt  # noqa: E402

TINY = {"hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "layers": 3}
SEQ = 200  # > hidden: ceil(200 / 64) = 4 MLP shards, the last one shorter


def _ids():
    return torch.randint(0, bench_length.VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_alst_patch_uses_deepspeed_tiled_mlp_on_every_layer():
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP  # noqa: F401

    stack = bench_length.AlstStack(bench_length.build_hf(TINY, SEQ), trim_heap=False, loss_chunk_rows=64)
    layers = stack.hf.model.layers
    assert len(layers) == TINY["layers"]
    x = torch.randn(1, SEQ, TINY["hidden"], requires_grad=True)
    for layer in layers:
        assert layer.mlp.forward.__func__ is bench_length.tiled_mlp_forward
        assert type(layer.mlp(x).grad_fn).__name__ == "TiledMLPBackward"
        assert layer.gradient_checkpointing
    assert stack.hf.config._attn_implementation == "sdpa"
    plain = bench_length.build_hf(TINY, SEQ)  # patched per instance: another model keeps its MLP
    assert type(plain.model.layers[0].mlp(x).grad_fn).__name__ != "TiledMLPBackward"


def test_alst_stack_matches_plain_hf_and_ours_in_fp32():
    ids = _ids()
    plain = bench_length.build_hf(TINY, SEQ)
    plain.train()
    ref = plain(input_ids=ids, labels=ids, use_cache=False).loss  # full logits, HF's own loss
    ref.backward()

    stack = bench_length.AlstStack(bench_length.build_hf(TINY, SEQ), trim_heap=False, loss_chunk_rows=64)
    loss = stack.loss(ids, torch.arange(SEQ)[None])  # 4 loss shards, 4 MLP shards per layer
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got, want = _grads(stack.hf), _grads(plain)
    assert got.keys() == want.keys() and len(got) == len(list(plain.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)

    ours = bench_length.Ours(adapt(bench_length.build_hf(TINY, SEQ), "cpu_flash"))  # same seed, same weights
    torch.testing.assert_close(ours.loss(ids, torch.arange(SEQ)[None]), ref, rtol=1e-5, atol=1e-6)


def test_loss_comparison_can_fail():
    """The fp32 comparison above is not vacuous: one changed weight changes the ALST stack's loss."""
    ids = _ids()
    stack = bench_length.AlstStack(bench_length.build_hf(TINY, SEQ), trim_heap=False, loss_chunk_rows=64)
    hf = bench_length.build_hf(TINY, SEQ)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    changed = bench_length.AlstStack(hf, trim_heap=False, loss_chunk_rows=64)
    assert not torch.allclose(stack.loss(ids, None), changed.loss(ids, None), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not heap_trim_available(), reason="needs glibc malloc_trim")
def test_alst_trims_the_heap_where_our_checkpoint_baseline_does():
    ids = _ids()
    stack = bench_length.AlstStack(bench_length.build_hf(TINY, SEQ), trim_heap=True, loss_chunk_rows=64)
    stack.loss(ids, torch.arange(SEQ)[None]).backward()
    ck = apply_activation_memory(
        adapt(bench_length.build_hf(TINY, SEQ), "cpu_flash"), {"mode": "recompute", "trim_heap": True}
    )
    ck(input_ids=ids, labels=ids).loss.backward()
    # before every layer after the first, and where each layer's backward starts
    assert stack.stats()["heap_trims"] == activation_stats(ck)["heap_trims"] == 2 * TINY["layers"] - 1


def test_activation_configs_are_the_ones_the_issue_names():
    mem = bench_length.activation_cfg("ours_memory", 1024, "/tmp/x")
    assert mem == {
        "mode": "tokenwise",
        "keep_last": 0,
        "tile_rows": 1024,
        "trim_heap": True,
        "tier": "file",
        "alpha": 0.0,
        "file_dir": "/tmp/x",
    }
    assert bench_length.activation_cfg("ours_auto", 0, "d")["alpha"] == "auto"
    assert bench_length.activation_cfg("sweep_0.25", 0, "d", link_gbps=2.0)["alpha"] == 0.25
    assert bench_length.activation_cfg("sweep_auto", 0, "d", link_gbps=2.0)["link_gbps"] == 2.0
    assert bench_length.activation_cfg("checkpoint", 0, "d") == {"mode": "recompute", "trim_heap": True}
    for system in ("ours_memory", "ours_auto", "checkpoint", "sweep_auto"):
        ActivationConfig(**bench_length.activation_cfg(system, 0, "d", link_gbps=1.0))  # valid keys


def test_fit_line_recovers_a_slope_and_rejects_too_few_points():
    xs = [1024.0, 2048.0, 4096.0]
    fit = bench_length.fit_line(xs, [40.5 * 1024 * x + 3e8 for x in xs])
    assert fit["slope"] == pytest.approx(40.5 * 1024) and fit["intercept"] == pytest.approx(3e8)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = bench_length.fit_line(xs, [1.0, 5.0, 4.0])
    assert noisy["r2"] < 0.9 and noisy["slope"] == pytest.approx(3 / 3584 * 1.0, rel=0.5)
    with pytest.raises(ValueError):
        bench_length.fit_line([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_search_doubles_without_a_cap_then_bisects():
    calls = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= 5000

    assert bench_common.search_lengths(fits, 1024, 256) == (4864, False)
    assert calls[:4] == [1024, 2048, 4096, 8192]
    assert bench_common.search_lengths(lambda n: n <= 10**6, 1024, 1024)[0] == 999424  # far above 8192
    assert bench_common.search_lengths(lambda n: False, 1024, 256) == (0, False)


def test_verdicts():
    le, ge = ("<=", 0.85), (">=", 1.5)
    assert bench_length.bound_verdict(0.8, le) == "hit"
    assert bench_length.bound_verdict(0.9, le) == "miss"
    assert bench_length.bound_verdict(0.8, le, 0.7, 0.9) == "at the threshold"
    assert bench_length.bound_verdict(1.6, ge) == "hit"
    assert bench_length.bound_verdict(1.4, ge) == "miss"
    # max length: each answer is known to within the resolution
    alst = {"max_len": 10240, "unbounded": False}
    r = bench_length.max_len_ratio({"max_len": 20480, "unbounded": False}, alst, 512, ge)
    assert r["value"] == 2.0 and r["low"] == pytest.approx(20480 / 10752) and r["verdict"] == "hit"
    r = bench_length.max_len_ratio({"max_len": 15360, "unbounded": False}, alst, 512, ge)
    assert r["value"] == 1.5 and r["verdict"] == "at the threshold"
    r = bench_length.max_len_ratio({"max_len": 12288, "unbounded": False}, alst, 512, ge)
    assert r["verdict"] == "miss"
    paired = bench_common.paired([0.7, 0.72, 0.71, 0.69, 0.7], [1.0] * 5, 0.85)
    assert paired["verdict"] == "hit" and paired["median"] == pytest.approx(0.7)


def test_search_starts_at_half_the_slope_prediction_and_finds_the_same_length(monkeypatch):
    """The slope fit only moves where the doubling starts: from that start and from the bottom the
    search ends on the same length; a guess that is over falls back to the bottom."""
    from types import SimpleNamespace

    mib = 2**20
    args = SimpleNamespace(spec=TINY, spec_search=TINY, budget=1000 * mib, resolution=512, search_start=1024)
    slopes = {"ours_memory": {"slope": 10_000.0, "intercept": 50 * mib, "points": [{"rss_built": 600 * mib}]}}
    start = bench_length.search_start_for("ours_memory", slopes, args)
    predicted = (1000 - 600 - 50) * mib / 10_000.0
    assert start == int(0.5 * predicted) // 512 * 512 and start > args.search_start
    assert bench_length.search_start_for("alst", slopes, args) == 1024  # no fit: from the bottom
    other = SimpleNamespace(**{**vars(args), "spec_search": {**TINY, "layers": 32}})
    assert bench_length.search_start_for("ours_memory", slopes, other) == 1024

    for true_max in (5000, 20_000, 700):
        probes: list[int] = []

        def fake_probe(job, args, true_max=true_max, probes=probes):
            probes.append(job["seq_len"])
            return {"fits": job["seq_len"] <= true_max, "rss": 0, "wall_s": 0}

        monkeypatch.setattr(bench_length, "run_probe", fake_probe)
        monkeypatch.setattr(bench_length, "_job", lambda system, n, args, spec=None: {"seq_len": n})
        results = [bench_length.search_max_len("ours_memory", args, s)["max_len"] for s in (start, None)]
        assert results[0] == results[1] and true_max - 512 < results[0] <= true_max, (true_max, results)

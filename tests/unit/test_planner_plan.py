"""``longtrain plan`` (planner/decide.py, planner/cli.py): the published settings on paper, the
plan file the trainer reads, the decision against a brute force, bad input.

MEMO: a 7B model trains on 1M-token sequences on 8 x A800 (reference/memo.md); ALST: Llama-3.1-8B
at 500K tokens on one H100-80GB and 3.7M on 8 (reference/long_context_anchors.md), plain HF
training not above ~32K. The recipes memo_7b_1m and llama3_8b_128k have those models' sizes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest

from longtrain.offload.plan import load_plan
from longtrain.planner.decide import Fixed, max_seq_len, search, states_outside_arena
from longtrain.planner.estimate import Job, LayerChoice, Layout, ModelShape, estimate
from longtrain.planner.hardware import hardware
from longtrain.planner.step_arena import plan_step
from longtrain.trainer.cli import main
from longtrain.trainer.compose import compose

ALST = "llama3_8b_128k"


def plan(capsys, *argv: str) -> tuple[int, dict, list[str]]:
    code = main(["plan", *argv, "--json"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), err


def tokenwise_alphas(result: dict) -> list[float]:
    return [a for m, a in zip(result["modes"], result["alpha"], strict=True) if m == "tokenwise"]


def test_memo_7b_1m_on_8_a800_fits_with_alpha_below_1(capsys):
    code, result, err = plan(capsys, "memo_7b_1m", "hardware=a800_80g", "--gpus", "8")
    assert code == 0 and result["fits"], (result, err)
    alphas = tokenwise_alphas(result)
    assert alphas and max(alphas) < 1
    assert result["device_bytes"] <= result["device_capacity_bytes"]
    assert result["max_seq_len"] >= 2**20
    assert 0 < result["predicted_mfu"] <= 0.6 and result["predicted_step_s"] > 0
    assert result["suggestion"] is None
    for key in ("alpha", "tile_rows", "mem_bytes"):
        assert key in result


def test_memo_without_activation_memory_does_not_fit(capsys):
    code, result, _ = plan(capsys, "memo_7b_1m", "hardware=a800_80g", "--gpus", "8", "activation.mode=none")
    assert code == 1 and not result["fits"]
    assert "device" in result["over_bytes"]
    assert "activation.mode" in result["suggestion"]


@pytest.mark.parametrize(("gpus", "seq_len"), [(1, 600_000), (8, 4_400_000)])
def test_alst_settings_fit_with_tiles_tokenwise_and_optimizer_offload(capsys, gpus, seq_len):
    code, result, err = plan(
        capsys, ALST, f"train.seq_len={seq_len}", "hardware=h100_80g", "--gpus", str(gpus)
    )
    assert code == 0 and result["fits"], (result, err)
    assert result["max_seq_len"] >= seq_len
    tokenwise = [r for m, r in zip(result["modes"], result["tile_rows"], strict=True) if m == "tokenwise"]
    assert tokenwise and all(r > 0 for r in tokenwise)  # tiles
    # ALST's own setup, optimizer state in DRAM, fits too
    code, alst, err = plan(
        capsys,
        ALST,
        f"train.seq_len={seq_len}",
        "hardware=h100_80g",
        "--gpus",
        str(gpus),
        "optim.offload=dram",
    )
    assert code == 0 and alst["fits"] and alst["layout"]["optim_tier"] == "dram", (alst, err)
    if gpus == 8:  # 8 ranks' layer inputs and attention outputs overflow the node's 2 TB: the file tier
        assert "file" in result["tiers"]
    code, result, _ = plan(
        capsys,
        ALST,
        f"train.seq_len={seq_len}",
        "hardware=h100_80g",
        "--gpus",
        str(gpus),
        "activation.mode=recompute",
        "activation.tile_rows=0",
    )
    assert code == 1 and not result["fits"] and result["suggestion"]
    assert "device" in result["over_bytes"] and result["max_seq_len"] < seq_len / 4


def test_written_plan_is_what_the_trainer_reads(capsys, tmp_path):
    path = tmp_path / "activation.plan.json"
    code = main(["plan", "memo_7b_1m", "hardware=a800_80g", "--gpus", "8", "--json", "--write", str(path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    cfg = compose("memo_7b_1m", result["overrides"])
    plan_ = load_plan(cfg.activation, 32)
    assert [layer.mode for layer in plan_.layers] == result["modes"]
    assert [layer.tile_rows for layer in plan_.layers] == result["tile_rows"]
    assert cfg.parallel.context_parallel * max(1, cfg.parallel.data_parallel) <= 8


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["hardware=tpu_v5"], "known: a800_80g"),
        (["hardware.host_bytes=0"], "host_bytes must be > 0"),
        (["hardware.colour=1"], "unknown key hardware.colour"),
        (["activation.host_budget_bytes=0"], "activation.host_budget_bytes"),
        (["optim.dram_budget_bytes=-1"], "optim.dram_budget_bytes"),
        (["--gpus", "0"], "--gpus must be >= 1"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, needle):
    code, _, err = plan(capsys, "memo_7b_1m", *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("longtrain: error: ") and needle in err[0], err


def small_shape() -> ModelShape:
    return ModelShape(
        layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=160, vocab=256,
        layer_params=40_000, other_params=30_000, dtype_bytes=2,
    )  # fmt: skip


@pytest.mark.parametrize("link_bps", [2e10, 3e7, 1e7])
def test_search_is_no_slower_than_a_brute_force_over_per_layer_choices(link_bps):
    """Every assignment of keep / recompute / tokenwise x alpha grid x tier to 3 layers, one tile
    size, on a small made-up node where the device holds one kept layer, the host ~2 layers at
    alpha 0.5 and the disk ~1: the search's plan fits and is at least as fast as the best
    assignment that fits, the whole step's arena (level 2) included (its alphas are continuous,
    the grid's are not). Behind the slow link the copies cost more than recomputing, and the best
    assignment recomputes."""
    shape, job = small_shape(), Job(seq_len=4096)
    hw = dataclasses.replace(
        hardware("h100_80g"),
        flops=2e11,
        device_to_host_bps=link_bps,
        device_bytes=27 * 10**6,
        reserved_bytes=0,
        host_bytes=int(12.5e6),
        nvme_bytes=7 * 10**6,
        nvme_dwpd=1e9,
        gpus_per_node=1,
    )
    layout = Layout(1, 1, "none", "device")
    fixed = Fixed(cp=1, shard="none", optim_tier="device", tile_rows=512)
    found = search(shape, job, hw, 1, fixed)
    options = [LayerChoice("keep"), LayerChoice("recompute", tile_rows=512)] + [
        LayerChoice("tokenwise", a, tier, 512)
        for a in (0.0, 0.25, 0.5, 0.75, 1.0)
        for tier in ("host", "file")
    ]
    best, kinds = None, set()
    for layers in itertools.product(options, repeat=shape.layers):
        est = estimate(shape, layout, job, list(layers), hw)
        fits = (
            est.device_bytes <= hw.usable_device_bytes
            and est.host_bytes_per_node <= 0.9 * hw.host_bytes
            and est.file_bytes_per_node <= 0.9 * hw.nvme_bytes
        )
        if fits and (best is None or est.step_s < best[0]):
            arena = plan_step(shape, layout, job, list(layers), quick=True)
            fits = states_outside_arena(shape, layout) + arena.peak <= hw.usable_device_bytes
        if fits and (best is None or est.step_s < best[0]):
            best = (est.step_s, layers)
    assert best is not None and found.fits
    assert found.estimate.step_s <= best[0] * (1 + 1e-9), (found.layers, best)
    kinds = {(c.mode, c.tier) for c in best[1]}
    assert len(kinds) > 1  # the constraints bind: the best assignment mixes modes or tiers
    assert ("recompute" in [c.mode for c in best[1]]) == (link_bps < 1e8)


def test_search_recomputes_where_only_recompute_fits():
    """A node whose host cannot hold one layer's whole tensors and with no disk: no token-wise
    layer fits anywhere, the device holds one kept layer, so the other layers must be recomputed
    (inputs only on the device). Token-wise asked for on the command line stays as asked and
    does not fit."""
    shape, job = small_shape(), Job(seq_len=4096)
    whole = job.seq_len * shape.whole_bytes
    hw = dataclasses.replace(
        hardware("h100_80g"),
        device_bytes=27 * 10**6,
        reserved_bytes=0,
        host_bytes=int(whole / 0.9) - 1,
        nvme_bytes=1,
        gpus_per_node=1,
    )
    fixed = Fixed(cp=1, shard="none", optim_tier="device")
    found = search(shape, job, hw, 1, fixed)
    assert found.fits
    assert [c.mode for c in found.layers] == ["recompute", "recompute", "keep"]
    assert found.estimate.mem_bytes["host.activations"] == 0
    assert search(shape, job, hw, 1, fixed, first=True).fits  # the feasibility check agrees
    assert not search(shape, job, hw, 1, dataclasses.replace(fixed, mode="tokenwise")).fits


def test_recompute_is_priced_from_measured_pieces():
    """The calibration's model with fixed step pieces behind a 10 MB/s link: a token-wise layer's
    whole tensors take ~0.1 s each way, recomputing a layer one measured forward (7 ms), so on a
    device that cannot keep every layer the search recomputes rather than swapping, and the plan's
    predicted recompute seconds are the measured forwards."""
    from longtrain.planner.profile import StepTimes

    shape = ModelShape(4, 128, 4, 2, 32, 512, 101, 246_016, 25_984, 4)
    times = StepTimes(1024, 7e-3, 14e-3, 5e-3, 0.0, 2.5e-3, 2.5e-3)
    job, layout = Job(1024), Layout(1)
    rec = [LayerChoice("recompute")] * 4
    room = estimate(shape, layout, job, rec, hardware("h100_80g")).device_bytes + 8 * 2**20
    hw = dataclasses.replace(
        hardware("h100_80g"), device_to_host_bps=1e7, device_bytes=room, reserved_bytes=0, gpus_per_node=1
    )
    fixed = Fixed(cp=1, shard="none", optim_tier="device", tile_rows=0)
    found = search(shape, job, hw, 1, fixed, times=times)
    n_rec = sum(c.mode == "recompute" for c in found.layers)
    assert found.fits and n_rec >= 1 and {c.mode for c in found.layers} <= {"recompute", "keep"}
    assert found.estimate.parts_s["recompute"] == pytest.approx(n_rec * times.layer_forward_s)
    # the same layers token-wise instead (alpha 0 is their fastest behind this link) are slower
    swapped = [LayerChoice("tokenwise") if c.mode == "recompute" else c for c in found.layers]
    assert found.estimate.step_s < estimate(shape, layout, job, swapped, hw, times).step_s


def test_explicit_recompute_stays_as_set(capsys):
    code, result, err = plan(capsys, "tiny_cpu", "hardware=h100_80g", "activation.mode=recompute")
    assert code == 0 and result["fits"], err
    assert result["modes"] == ["recompute"] * 4


def test_trainer_runs_the_written_plan(capsys, tmp_path):
    """The file and overrides ``--write`` gives are what ``longtrain train`` runs, as they are."""
    path = tmp_path / "plan.json"
    tiny = ["train.seq_len=128", "data.micro_batch_size=2", "train.grad_accum=1", "activation.keep_last=0"]
    code = main(["plan", "tiny_cpu", *tiny, "hardware=cpu", "--gpus", "1", "--json", "--write", str(path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["modes"] == ["tokenwise"] * 4
    assert result["time_model"] == "measured"  # hardware=cpu: this machine's step pieces, timed
    run = [
        f"output_dir={tmp_path / 'run'}",
        "train.steps=1",
        "optim.warmup_steps=0",
        "logging.progress=false",
    ]
    assert main(["train", "tiny_cpu", *tiny, *run, *result["overrides"]]) == 0
    assert "done: step 1" in capsys.readouterr().out


def test_a_fixed_alpha_the_host_cannot_hold_does_not_fit(capsys):
    """activation.alpha set on the command line stays as set: 8 ranks' rows at alpha 0.9 overflow
    the node's DRAM; freeing alpha, or a shorter sequence, fits."""
    argv = ["memo_7b_1m", "hardware=a800_80g", "--gpus", "8", "activation.alpha=0.9", "activation.tier=host"]
    code, result, _ = plan(capsys, *argv)
    assert code == 1 and "host" in result["over_bytes"]
    assert 0 < result["max_seq_len"] < 2**20
    assert "drop activation.alpha=0.9" in result["suggestion"]
    assert f"lower train.seq_len to {result['max_seq_len']}" in result["suggestion"]


def test_search_weighs_the_turnaround_like_uniform_alpha():
    """The calibration's model (4 fp32 layers, 1024 tokens) with fixed step pieces behind 0.5 and
    2 GB/s links: the search's host alpha (keep_last 0, tier host, untiled) is the one alpha that
    minimises the whole predicted step, the forward-to-backward turn included
    (decide.uniform_alpha), and its step is no slower than any alpha of a fine grid."""
    from longtrain.planner.decide import uniform_alpha
    from longtrain.planner.estimate import step_seconds
    from longtrain.planner.profile import StepTimes

    shape = ModelShape(4, 128, 4, 2, 32, 512, 101, 246_016, 25_984, 4)
    times = StepTimes(1024, 7e-3, 14e-3, 5e-3, 0.0, 2.5e-3, 2.5e-3)
    job, layout = Job(1024), Layout(1)
    fixed = Fixed(
        mode="tokenwise", tier="host", keep_last=0, tile_rows=0, cp=1, shard="none", optim_tier="device"
    )
    for gbps in (0.5, 2.0):
        hw = dataclasses.replace(hardware("cpu"), device_to_host_bps=gbps * 1e9)
        best = search(shape, job, hw, 1, fixed, times=times)
        alpha = best.layers[-1].alpha
        assert alpha == pytest.approx(uniform_alpha(shape, layout, job, hw, times=times), abs=1e-3)

        def step(a: float, hw=hw) -> float:
            return sum(
                step_seconds(shape, layout, job, [LayerChoice("tokenwise", a)] * 4, hw, times).values()
            )

        assert step(alpha) <= min(step(a / 100) for a in range(101)) + 1e-9


def test_a_job_the_estimate_fits_but_level_two_does_not_is_reported_as_not_fitting(capsys):
    """ALST's model at 640K tokens on one H100 with 64K-row tiles and alpha 0.5 on a host large
    enough for it, all three set on the command line: the estimate's device total fits, but at the
    turn from forward to backward the second-highest layer's copies (its whole tensors and two
    tiles of rows) are still in flight beside the loss and the topmost layer's prefetch (level 2),
    which does not fit. The verdict says so, and the longest sequence that fits stops below."""
    argv = [
        ALST,
        "hardware=h100_80g",
        "hardware.host_bytes=1e14",
        "activation.tile_rows=65536",
        "activation.alpha=0.5",
        "activation.tier=host",
    ]
    code, result, _ = plan(capsys, *argv, "train.seq_len=640000")
    cap, arena = result["device_capacity_bytes"], result["arena"]
    assert result["device_bytes"] <= cap  # the old verdict: fits
    assert code == 1 and not result["fits"] and not arena["fits_device"]
    assert result["over_bytes"] == {"device": arena["device_bytes"] - cap}
    longest = result["max_seq_len"]
    assert 0 < longest < 640_000
    code, at_longest, _ = plan(capsys, *argv, f"train.seq_len={longest}")
    assert code == 0 and at_longest["fits"] and at_longest["arena"]["device_bytes"] <= cap
    assert at_longest["tile_rows"] == [65536] * 32 and set(at_longest["alpha"]) == {0.5}


def random_job(rng: random.Random) -> tuple[ModelShape, Job, int]:
    heads, head_dim = rng.choice([2, 4]), rng.choice([16, 32])
    hidden = heads * head_dim
    ffn, vocab = rng.choice([2, 3, 4]) * hidden, rng.choice([256, 1000])
    shape = ModelShape(
        layers=rng.randint(2, 6), hidden=hidden, heads=heads, kv_heads=rng.choice([1, heads]),
        head_dim=head_dim, ffn=ffn, vocab=vocab,
        layer_params=4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden,
        other_params=2 * vocab * hidden + hidden, dtype_bytes=rng.choice([2, 4]),
    )  # fmt: skip
    return shape, Job(seq_len=rng.choice([1024, 2048, 4096])), rng.choice([1, 2])


@pytest.mark.parametrize("seed", range(24))
def test_verdict_agrees_with_the_level_two_arena_on_random_jobs(seed):
    """Random small models on one replicated layout, slow compute (so token-wise layers pay),
    devices from a fraction to 1.5 times one token-wise plan's level-2 bytes: the plan's device
    overflow is the larger of the estimate's and of its own arena's, solved again here (model
    states + peak over the usable memory), so a plan that fits fits both; a plan that fits also
    fits the tiers; the feasibility check (``max_seq_len``) agrees with the verdict."""
    rng = random.Random(seed)
    shape, job, gpus = random_job(rng)
    t, layout = job.tokens_per_rank(1), Layout(gpus)
    probe = [LayerChoice("tokenwise", 0.5, "host", 0)] * shape.layers
    states = states_outside_arena(shape, layout)
    hw = dataclasses.replace(
        hardware("h100_80g"),
        flops=2e11,
        device_bytes=states + int(plan_step(shape, layout, job, probe).peak * rng.uniform(0.3, 1.5)),
        reserved_bytes=0,
        host_bytes=int(rng.choice([0.5, 4.0]) * shape.layers * t * shape.plain_bytes * gpus),
        nvme_bytes=int(2 * shape.layers * t * shape.plain_bytes * gpus),
        nvme_dwpd=1e9,
        gpus_per_node=gpus,
    )
    fixed = Fixed(cp=1, shard="none", optim_tier="device")
    found = search(shape, job, hw, gpus, fixed)
    arena = plan_step(shape, found.layout, job, found.layers, quick=True)
    assert found.arena is not None and found.arena.peak == arena.peak
    est, usable = found.estimate, hw.usable_device_bytes
    assert found.over.get("device", 0) == max(0, est.device_bytes - usable, states + arena.peak - usable)
    assert found.fits == (not found.over)
    if found.fits:
        assert est.host_bytes_per_node <= 0.9 * hw.host_bytes
        assert est.file_bytes_per_node <= 0.9 * hw.nvme_bytes
    assert search(shape, job, hw, gpus, fixed, first=True).fits == found.fits
    assert (max_seq_len(shape, job, hw, gpus, fixed) >= job.seq_len) == found.fits

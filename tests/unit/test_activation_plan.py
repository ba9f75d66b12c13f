"""Per-layer activation plans (``ActivationPlan``, ``activation.plan=FILE.json``) and the emulated
device<->host link (``activation.link_gbps``).

Oracles:
* loss and gradients: the plain model (mode none), bit-equal (``torch.equal``) in float64. Every
  layer mode computes the plain floats (test_activation_modes.py says why): tokenwise rebuilds rows
  cut on a BLAS tile boundary, recompute re-runs the same ops, keep is plain autograd; mixing them
  along the depth changes only where each layer's saved tensors live;
* bytes: each tokenwise layer sends ``t * whole + a * rows`` bytes to its tier, with (whole, rows)
  derived by hand in tests/saved_bytes.py and ``a = cost.split_row(alpha, t)``;
* the emulated link: every copy takes at least bytes / bandwidth, read off the copy engine's timer.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from saved_bytes import dims, skeletal_bytes_per_token
from tiny import tiny_adapted_model

from longtrain.config_checks import ConfigError
from longtrain.offload import (
    ActivationConfig,
    ActivationPlan,
    LayerPlan,
    activation_stats,
    apply_activation_memory,
    cost,
    profile,
)

VOCAB = 101
TIMINGS = ("copy_s", "copy_exposed_s", "copy_hidden_s", "heap_trim_s")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_model(layers=4, dtype=torch.float64):
    """hidden 64, 4 query heads sharing 2 kv heads, random biases and norm weights."""
    return tiny_adapted_model("llama", dtype, layers=layers, vocab=VOCAB)


def ids_of(s, b=1, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def run(model, ids, activation):
    """(loss, grads, stats after forward, stats after backward, tier -> store bytes after backward)."""
    apply_activation_memory(model, activation)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    after_forward = activation_stats(model)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    executor = model.layer_executor
    stored = {tier: e.store.nbytes() for tier, e in getattr(executor, "engines", {}).items()}
    executor.close()
    return out.loss.detach(), grads, after_forward, activation_stats(model), stored


def assert_identical(got, ref, label):
    (loss, grads), (ref_loss, ref_grads) = got[:2], ref[:2]
    assert torch.equal(loss, ref_loss), f"{label}: loss {loss.item()!r} != {ref_loss.item()!r}"
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), (
            f"{label}: grad of {name} differs by {(grads[name] - g).abs().max():.3e}"
        )


# ------------------------------------------------------------------------------ mixed plans

# fmt: off
MIXED = {
    "host-recompute-file-keep": (
        LayerPlan("tokenwise", 0.3, "host"), LayerPlan("recompute"),
        LayerPlan("tokenwise", 0.0, "file"), LayerPlan("keep"),
    ),
    "recompute-keep-file-host": (
        LayerPlan("recompute"), LayerPlan("keep"),
        LayerPlan("tokenwise", 0.77, "file"), LayerPlan("tokenwise", 1.0, "host"),
    ),
}
# fmt: on


@pytest.mark.parametrize("order", MIXED)
@pytest.mark.parametrize("b, s", [(1, 64), (2, 37)])
def test_mixed_plan_equals_plain_and_counts_bytes_per_layer(tmp_path, order, b, s):
    """Four layers, each in its own mode, alpha and tier, in two orders along the depth; t = 64 and
    t = 74 rows (cuts that are and are not the whole length)."""
    model = tiny_model()
    ids = ids_of(s, b)
    t = b * s
    ref = run(model, ids, {"mode": "none"})
    plan = ActivationPlan(MIXED[order], file_dir=str(tmp_path))
    got = run(model, ids, plan)
    assert_identical(got, ref, order)

    whole, rows = skeletal_bytes_per_token(**dims(model))
    _, _, fwd, bwd, stored = got
    expected = {"host": 0, "file": 0}
    for i, layer in enumerate(plan.layers):
        if layer.mode != "tokenwise":
            assert not any(key.startswith(f"layer{i}_") for key in fwd), (i, layer)
            continue
        a = cost.split_row(layer.alpha, t)
        assert fwd[f"layer{i}_{layer.tier}_bytes"] == t * whole + a * rows, i
        assert fwd[f"layer{i}_alpha"] == layer.alpha
        assert fwd[f"layer{i}_recomputed_rows"] == t - a
        expected[layer.tier] += t * whole + a * rows
    assert (fwd["host_bytes"], fwd["file_bytes"]) == (expected["host"], expected["file"])
    assert stored == expected  # what the stores really hold once the copies have landed
    assert fwd["offloaded_layers"] == 2 and fwd["recomputed_layers"] == 1
    assert fwd["recomputed_rows"] == sum(v for k, v in fwd.items() if k.endswith("_recomputed_rows"))
    assert "alpha" not in fwd  # the layers' alphas differ: only the per-layer values mean something
    for key in ("host_bytes", "file_bytes", "recomputed_rows", "layer2_file_bytes"):
        assert bwd.get(key) == fwd.get(key), key  # the step's statistics until the next forward
    assert list(tmp_path.iterdir()) == []  # close() deleted the file tier's file


def test_uniform_config_equals_its_explicit_plan():
    """alpha 0.3, keep_last 1 on 4 layers is the plan tokenwise x 3 + keep: same executor, same
    gradients, same statistics (timings aside)."""
    model = tiny_model()
    ids = ids_of(64)
    cfg = ActivationConfig(mode="tokenwise", alpha=0.3, keep_last=1)
    plan = ActivationPlan((LayerPlan("tokenwise", 0.3),) * 3 + (LayerPlan("keep"),))
    assert ActivationPlan.from_config(cfg, 4) == plan
    uniform, explicit = run(model, ids, cfg), run(model, ids, plan)
    assert_identical(explicit, uniform, "explicit plan")
    for got, ref in zip(explicit[2:4], uniform[2:4], strict=True):
        assert {k: v for k, v in got.items() if k not in TIMINGS} == {
            k: v for k, v in ref.items() if k not in TIMINGS
        }
    stats = uniform[2]
    assert stats["alpha"] == 0.3 and stats["offload_rows_per_layer"] == cost.split_row(0.3, 64)
    assert [stats[f"layer{i}_alpha"] for i in range(3)] == [0.3] * 3 and "layer3_alpha" not in stats
    assert_identical(uniform, run(model, ids, {"mode": "none"}), "uniform")


def test_per_layer_auto_alpha_with_fixed_layers_beside_it(monkeypatch):
    """alpha "auto" on some layers of a tier, fixed alphas on others: the auto layers share the budget
    the fixed ones leave. A link fast enough for everything makes the budget the only limit."""
    monkeypatch.setattr(profile, "copy_bandwidth", lambda *args, **kwargs: 1e18)
    model = tiny_model()
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t = 64
    fixed = t * whole + cost.split_row(1.0, t) * rows  # layer 0 at alpha 1
    budget = fixed + 2 * (t * whole + 20 * rows)  # two auto layers, 20 rows each
    layers = (LayerPlan("tokenwise", 1.0), LayerPlan("tokenwise", "auto"), LayerPlan("recompute"))
    plan = ActivationPlan(layers + (LayerPlan("tokenwise", "auto"),), host_budget_bytes=budget)
    got = run(model, ids_of(t), plan)
    assert_identical(got, run(model, ids_of(t), {"mode": "none"}), "auto")
    stats = got[2]
    assert stats["layer1_alpha"] == stats["layer3_alpha"] == 20 / t
    assert stats["layer0_alpha"] == 1.0
    assert stats["host_bytes"] == fixed + 2 * (t * whole + 16 * rows) <= budget  # 20 rows cut to a tile: 16


# ------------------------------------------------------------------------------ the emulated link


def test_emulated_link_holds_every_copy_for_bytes_over_bandwidth():
    """Every offload and every fetch of a step goes through the link: the copy engine's timer adds
    up at least (bytes written + bytes read) / bandwidth."""
    model = tiny_model(layers=3)
    gbps = 0.05  # 50 MB/s
    cfg = {"mode": "tokenwise", "alpha": 0.5, "keep_last": 1, "link_gbps": gbps}
    loss, grads, fwd, bwd, _ = run(model, ids_of(64), cfg)
    moved = 2 * bwd["host_bytes"]  # written in forward, read back in backward
    assert moved > 0
    assert bwd["copy_s"] >= moved / (gbps * 1e9)
    assert fwd["link_emulated_gbps"] == bwd["link_emulated_gbps"] == gbps
    assert_identical((loss, grads), run(model, ids_of(64), {"mode": "none"}), "emulated link")


def test_auto_alpha_is_fractional_behind_a_slow_link(monkeypatch):
    """The layer's forward time is pinned at 20 ms (the compute side is not what this tests). A
    memcpy moves a layer's bytes far faster: alpha 1. An emulated link that moves the whole tensors
    and half the rows in 20 ms: alpha near 0.5 (a little under: the measured bandwidth includes the
    real copy and the sleep's overshoot)."""
    monkeypatch.setattr(profile, "layer_forward_seconds", lambda *args, **kwargs: 0.02)
    model = tiny_model(layers=3)
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t = 64
    ids = ids_of(t)
    auto = {"mode": "tokenwise", "alpha": "auto", "keep_last": 1}
    fast = run(model, ids, auto)
    assert fast[2]["alpha"] == 1.0
    assert "link_emulated_gbps" not in fast[2]
    gbps = (t * whole + 0.5 * t * rows) / 0.02 / 1e9
    slow = run(model, ids, {**auto, "link_gbps": gbps})
    alpha = slow[2]["alpha"]
    assert 0.0 < alpha < 1.0 and abs(alpha - 0.5) < 0.2, alpha
    assert slow[2]["link_emulated_gbps"] == gbps
    assert_identical(slow, fast, "alpha auto behind the link")


def test_link_is_emulated_on_a_cpu_device_only():
    """A CUDA device has a real link (and issues its copies from the compute thread): rejected there,
    naming the key; on a CPU device one write of n bytes takes at least n / bandwidth."""
    from longtrain.offload import link, store

    with pytest.raises(ConfigError, match=r"^activation\.link_gbps emulates a link on a CPU device"):
        link.emulate_link(store.HostStore(), 1.0, torch.device("cuda"))
    assert isinstance(link.emulate_link(store.HostStore(), None, torch.device("cpu")), store.HostStore)
    slow = link.emulate_link(store.HostStore(), 0.01, torch.device("cpu"))  # 10 MB/s
    src = torch.ones(2**17, dtype=torch.float64)  # 1 MiB: at least 0.105 s
    t0 = time.perf_counter()
    slow.write(("k",), src)
    assert time.perf_counter() - t0 >= src.numel() * 8 / 1e7
    assert torch.equal(slow.read(("k",), torch.device("cpu")), src) and slow.nbytes() == 2**20
    slow.close()


# ------------------------------------------------------------------------------------ bad input

GOOD = [{"mode": "tokenwise", "alpha": 0.3}, {"mode": "recompute"}, {"mode": "keep"}, {"mode": "keep"}]


def with_layer(i, entry):
    return {"layers": [entry if j == i else e for j, e in enumerate(GOOD)]}


@pytest.mark.parametrize(
    "content, match",
    [
        ({"layers": GOOD[:3]}, r"has 3 layers but the model has 4"),
        ({"layers": GOOD + [{"mode": "keep"}]}, r"has 5 layers but the model has 4"),
        (with_layer(1, {"mode": "keep", "alhpa": 0.3}), r"layers\[1\] has unknown field\(s\) \['alhpa'\]"),
        (
            with_layer(2, {"mode": "tokenwise", "alpha": 1.5}),
            r"layers\[2\]\.alpha must be in \[0, 1\], got 1\.5",
        ),
        (with_layer(2, {"mode": "tokenwise", "alpha": -0.1}), r"layers\[2\]\.alpha must be in \[0, 1\]"),
        (with_layer(0, {"mode": "tokenwise", "alpha": True}), r"layers\[0\]\.alpha"),
        (with_layer(0, {"mode": "swap"}), r"layers\[0\]\.mode must be one of keep, recompute, tokenwise"),
        (with_layer(3, {"mode": "tokenwise", "tier": "ssd"}), r"layers\[3\]\.tier must be one of host, file"),
        (with_layer(1, {"alpha": 0.5}), r"layers\[1\]\.mode is missing"),
        (
            with_layer(0, {"mode": "keep", "tile_rows": 128}),
            r"layers\[0\]\.tile_rows=128 needs activation\.plan\.layers\[0\]\.mode tokenwise or recompute",
        ),
        (
            with_layer(1, {"mode": "tokenwise", "tile_rows": "big"}),
            r"layers\[1\]\.tile_rows must be an int >= 0 or 'auto', got 'big'",
        ),
        (
            with_layer(1, {"mode": "recompute", "tile_rows": 12.5}),
            r"layers\[1\]\.tile_rows must be an int >= 0 or 'auto', got 12\.5",
        ),
        (
            with_layer(0, {"mode": "tokenwise", "tile_rows": -1}),
            r"layers\[0\]\.tile_rows must be an int >= 0",
        ),
        (with_layer(3, "keep"), r"layers\[3\] must be an object"),
        (GOOD, r"must be a JSON object"),
        ({"layers": GOOD, "version": 1}, r"unknown key\(s\) \['version'\]"),
        ({"layers": {"0": GOOD[0]}}, r'"layers" must be a list'),
    ],
)
def test_bad_plan_file_is_one_line_naming_the_layer_and_field(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(content))
    model = tiny_model()
    before = model.layer_executor
    with pytest.raises(ConfigError, match=match) as err:
        apply_activation_memory(model, {"plan": str(path)})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"activation.plan {path}"), message
    assert model.layer_executor is before, "a rejected plan must leave the model as it was"


def test_plan_file_that_is_not_json_or_missing(tmp_path):
    model = tiny_model()
    path = tmp_path / "plan.json"
    path.write_text('{"layers": [{"mode": "keep"},]}')
    with pytest.raises(
        ConfigError, match=r"^activation\.plan .*plan\.json is not JSON \(.* line 1 column \d+\)$"
    ):
        apply_activation_memory(model, {"plan": str(path)})
    with pytest.raises(ConfigError, match=r"^activation\.plan .*absent\.json cannot be read"):
        apply_activation_memory(model, {"plan": str(tmp_path / "absent.json")})


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: ActivationConfig(mode="tokenwise", link_gbps=0),
            r"^activation\.link_gbps must be a number > 0, got 0",
        ),
        (
            lambda: ActivationConfig(mode="tokenwise", link_gbps=-1.0),
            r"^activation\.link_gbps must be a number > 0",
        ),
        (
            lambda: apply_activation_memory(tiny_model(layers=1), {"mode": "tokenwise", "link_gbps": "fast"}),
            r"^activation\.link_gbps must be",
        ),
        (
            lambda: ActivationConfig(mode="none", link_gbps=1.0),
            r"^activation\.link_gbps emulates the link of the tokenwise",
        ),
        (
            lambda: ActivationConfig(mode="none", tile_rows="big"),
            r"^activation\.tile_rows must be an int >= 0 or 'auto', got 'big'",
        ),
        (
            lambda: ActivationConfig(mode="tokenwise", tile_rows=-1),
            r"^activation\.tile_rows must be an int >= 0",
        ),
        (lambda: ActivationConfig(plan=""), r"^activation\.plan must be a non-empty string"),
        (
            lambda: ActivationPlan((LayerPlan("keep"),), link_gbps=0.0),
            r"^activation\.link_gbps must be a number > 0",
        ),
        (
            lambda: ActivationPlan((LayerPlan("tokenwise", 2.0),)),
            r"^activation\.plan\.layers\[0\]\.alpha must be in",
        ),
    ],
)
def test_bad_activation_keys_name_the_key(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_plan_of_the_wrong_length_and_file_tier_without_dir_fail_at_apply_time():
    model = tiny_model()
    before = model.layer_executor
    with pytest.raises(ConfigError, match=r"^activation\.plan has 3 layers but the model has 4"):
        apply_activation_memory(model, ActivationPlan((LayerPlan("keep"),) * 3))
    with pytest.raises(ConfigError, match=r"activation\.file_dir"):
        apply_activation_memory(
            model, ActivationPlan((LayerPlan("tokenwise", 0.5, "file"),) + (LayerPlan("keep"),) * 3)
        )
    assert model.layer_executor is before


# ------------------------------------------------------------------------------------ the trainer


def _train(out_dir, *overrides):
    from longtrain.trainer.compose import compose
    from longtrain.trainer.train import train

    cfg = compose(
        "tiny_cpu",
        [
            "train.steps=3",
            "train.seq_len=64",
            "train.log_every=1",
            "train.dtype=float64",
            "optim.warmup_steps=1",
            "data.micro_batch_size=2",
            "logging.progress=false",
            "checkpoint.enabled=false",
            f"output_dir={out_dir}",
            *overrides,
        ],
    )
    return train(cfg)


def test_trainer_reads_a_plan_file(tmp_path):
    """tiny_cpu (4 layers, fp64) with a plan file of four different layers: the losses equal a
    mode=none run's (within 1e-10, the trainer tests' tolerance), and metrics.jsonl has the
    per-layer statistics."""
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps(
            {
                "layers": [
                    {"mode": "tokenwise", "alpha": 0.5, "tier": "host"},
                    {"mode": "recompute"},
                    {"mode": "tokenwise", "alpha": 0, "tier": "file"},
                    {"mode": "keep"},
                ]
            }
        )
    )
    logged = _train(tmp_path / "plan", "activation.mode=tokenwise", f"activation.plan={path}")
    plain = _train(tmp_path / "plain", "activation.mode=none")
    assert [m["step"] for m in logged] == [1, 2, 3]
    for m, p in zip(logged, plain, strict=True):
        assert abs(m["loss"] - p["loss"]) <= 1e-10, (m["step"], m["loss"], p["loss"])
    lines = [json.loads(line) for line in (tmp_path / "plan" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["layer0_host_bytes"] > line["layer2_file_bytes"] > 0
        assert (
            line["host_bytes"] == line["layer0_host_bytes"]
            and line["file_bytes"] == line["layer2_file_bytes"]
        )
        assert (line["layer0_alpha"], line["layer2_alpha"]) == (0.5, 0.0)
        assert line["recomputed_layers"] == 1 and line["offloaded_layers"] == 2
        assert not any(key.startswith(("layer1_", "layer3_")) for key in line)


def test_dry_run_reads_and_checks_the_plan_file(tmp_path):
    from longtrain.trainer.compose import compose
    from longtrain.trainer.plan import dry_run_report

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layers": GOOD}))
    cfg = compose("tiny_cpu", [f"activation.plan={path}", f"output_dir={tmp_path / 'out'}"])
    report, problems = dry_run_report(cfg)
    assert f"per-layer plan activation.plan={path} (2 keep, 1 recompute, 1 tokenwise" in report, report
    assert problems == []
    path.write_text(json.dumps({"layers": GOOD[:3]}))
    with pytest.raises(ConfigError, match=r"has 3 layers but the model has 4"):
        dry_run_report(cfg)


def test_layer_forward_time_is_measured_warm(monkeypatch):
    """alpha="auto" divides by the layer's forward time: the first (cold) run at a new length is not
    timed; the fastest of the warm runs is."""
    calls = []

    def fake_run_layer(parts, x, ctx):
        calls.append(len(calls))
        time.sleep(0.2 if len(calls) == 1 else 0.02)  # the cold run is 10x slower
        return x

    monkeypatch.setattr(profile, "run_layer", fake_run_layer)
    model = tiny_model(layers=1)
    x, ctx = model.layer_inputs(ids_of(16))
    seconds = profile.layer_forward_seconds(model.layer_parts[0], x, ctx)
    assert len(calls) == 3 and 0.02 <= seconds < 0.1, (calls, seconds)

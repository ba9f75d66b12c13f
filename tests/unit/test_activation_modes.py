"""Every activation-memory mode computes what the plain model computes: same loss, same gradients.

Oracle: the same adapted model with ``activation.mode=none`` (autograd keeps everything).

Tolerance: bit-equal (``torch.equal``) for every configuration here, fp64, fp32 and bf16 autocast
alike. That is what the math allows: token-wise recompute re-runs the same row-wise ops on a row
subset, and every op on these paths (matmul, RMSNorm, SiLU, RoPE) computes each output row from
its own input row only; attention is never re-run. Full recompute re-runs the same ops on the same
inputs and offload copies bytes. One caveat is the BLAS: a matmul is computed in tiles of rows,
and MKL on an AMD EPYC gives float64 rows that depend on their position in the tile (differences
of ~1e-19). The executor therefore cuts the recomputed rows on a multiple of
``cost.ROW_ALIGN`` rows, and ``test_matmul_rows_are_tile_independent`` checks the assumption this
file rests on, so a machine whose BLAS breaks it fails there with that reason.

Also: invalid ``activation.*`` values and unsupported model families fail at apply time with an
error naming the key to change; the trainer, run with tokenwise, logs its statistics and its losses
equal a mode=none run (fp64), and resumes after a crash.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from tiny import tiny_adapted_model

import longtrain.trainer.model.adapter as adapter_mod
from longtrain.offload import ActivationConfig, activation_stats, apply_activation_memory

VOCAB = 101
ALPHAS = (0.0, 0.3, 0.77, 1.0)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_model(family="llama", dtype=torch.float64, **kw):
    """hidden 64, 4 query heads sharing 2 kv heads (GQA), ffn 192 (HF default rounding); biases and
    norm weights random (HF's 0 and 1 would hide a rebuilt row that dropped one)."""
    return tiny_adapted_model(family, dtype, vocab=VOCAB, **kw)


def batch(b=1, s=64, seed=1, packed=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=gen)
    if not packed:
        return ids, None
    # documents restart at position 0 mid-row: row 0 holds 2 documents, row 1 holds 3
    cuts = [[0, s // 2 + 1], [0, 5, s - 7]]
    pos = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        bounds = cuts[r % 2] + [s]
        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
            pos[r, s0:s1] = torch.arange(s1 - s0)
    return ids, pos


def step(model, ids, pos, activation, autocast=False):
    """Forward + backward with ``activation`` installed; returns (loss, {name: grad})."""
    apply_activation_memory(model, activation)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=ids, position_ids=pos)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.layer_executor.close()
    return out.loss.detach().clone(), grads


def assert_identical(got, ref, label):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert torch.equal(loss, ref_loss), f"{label}: loss {loss.item()!r} != {ref_loss.item()!r}"
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        diff = (grads[name] - g).abs().max().item()
        assert torch.equal(grads[name], g), f"{label}: grad of {name} differs by {diff:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matmul_rows_are_tile_independent(dtype):
    """The bit-equality oracle's premise: rows [a, t) of a matmul computed alone are the same floats as
    in the full product when a is a multiple of cost.ROW_ALIGN (the executor's cut)."""
    from longtrain.offload.cost import ROW_ALIGN

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 64, dtype=dtype, generator=gen)
    w = torch.randn(48, 64, dtype=dtype, generator=gen)
    full = torch.nn.functional.linear(x, w)
    for a in range(0, 64, ROW_ALIGN):
        assert torch.equal(torch.nn.functional.linear(x[a:], w), full[a:]), (
            f"this BLAS computes rows differently when the matrix starts at row {a}; token-wise gradients "
            "can then differ from plain autograd by rounding (relax the oracle to fp64 <= 1e-12 here)"
        )


def tokenwise(alpha, keep_last=1):
    return {"mode": "tokenwise", "alpha": alpha, "keep_last": keep_last}


# ------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "family, dtype, b, s, packed",
    [
        ("llama", torch.float64, 1, 64, False),  # GQA; also keep_last 0 and > layers
        ("qwen2", torch.float64, 1, 64, False),  # q/k/v biases
        ("llama", torch.float64, 1, 37, False),  # odd length: a = 0, 11, 28, 37
        ("llama", torch.float64, 2, 37, True),  # packed documents, 2 rows
        ("mistral", torch.float64, 2, 37, True),
        ("llama", torch.float32, 1, 64, False),
        ("qwen2", torch.float32, 2, 37, True),
    ],
)
def test_all_modes_equal_plain(family, dtype, b, s, packed):
    """tokenwise(alpha) for every alpha, recompute and offload == plain, bit for bit."""
    model = tiny_model(family, dtype)
    ids, pos = batch(b, s, packed=packed)
    ref = step(model, ids, pos, {"mode": "none"})
    assert all(g.abs().sum() > 0 for g in ref[1].values()), "a parameter gets no gradient: vacuous oracle"
    for alpha in ALPHAS:
        assert_identical(step(model, ids, pos, tokenwise(alpha)), ref, f"tokenwise alpha={alpha}")
    if (family, dtype, s) == ("llama", torch.float64, 64):
        assert_identical(step(model, ids, pos, tokenwise(0.5, keep_last=0)), ref, "tokenwise keep_last=0")
        assert_identical(step(model, ids, pos, tokenwise(0.5, keep_last=9)), ref, "keep_last > layers")
    for mode in ("recompute", "offload"):
        assert_identical(step(model, ids, pos, {"mode": mode}), ref, mode)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_tokenwise_with_other_attention_backends(backend):
    model = tiny_model(backend=backend)
    ids, pos = batch(2, 37, packed=True)
    ref = step(model, ids, pos, {"mode": "none"})
    for alpha in (0.0, 0.3, 1.0):
        assert_identical(step(model, ids, pos, tokenwise(alpha)), ref, f"{backend} alpha={alpha}")


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa"])
def test_tokenwise_under_bf16_autocast_equals_plain(backend):
    """fp32 weights, bf16 autocast; tokenwise vs plain under the same autocast: bit-equal. (The
    RoPE tables are float32 under autocast; apply_rope rotates in the projections' dtype, so q, k
    and v reach the attention core in one dtype.)

    t = 64 = hidden size on purpose: under autocast ``linear`` saves the transposed bf16 cast of its
    weight, a [64, out] tensor whose first dim equals t. It must be recognised as a parameter, not
    offloaded and "recomputed" as token rows (the rerun on t - a rows then saved fewer row tensors
    and backward raised)."""
    model = tiny_model("llama", torch.float32, backend=backend)
    ids, _ = batch(1, 64)
    ref = step(model, ids, None, {"mode": "none"}, autocast=True)
    for alpha in ALPHAS:
        assert_identical(
            step(model, ids, None, tokenwise(alpha), autocast=True), ref, f"bf16 autocast alpha={alpha}"
        )
    for mode in ("recompute", "offload"):
        assert_identical(step(model, ids, None, {"mode": mode}, autocast=True), ref, f"bf16 autocast {mode}")


class ShuffledSavesAttention(torch.autograd.Function):
    """The CPU flash core behind another autograd Function that saves its tensors in a different
    order, a view of out instead of out, and two extra tensors a core may keep (a GQA-expanded
    copy of k, with t rows like a row tensor, and a small state tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, backend, docs, scale):
        out, lse = backend.forward(q, k, v, docs, scale)
        k_rep = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [t, n, d]
        state = torch.arange(3, dtype=q.dtype)
        ctx.save_for_backward(lse, v, out.view(out.shape[0], -1), k_rep, q, state, k)
        ctx.backend, ctx.docs, ctx.scale = backend, docs, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        lse, v, out_flat, k_rep, q, state, k = ctx.saved_tensors
        # the extras come back as they were saved
        assert torch.equal(k_rep, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1))
        assert torch.equal(state, torch.arange(3, dtype=q.dtype))
        out = out_flat.view(dout.shape)
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.docs, ctx.scale)
        return dq, dk, dv, None, None, None


def shuffled_attention(q, k, v, docs, backend, scale=None):
    return ShuffledSavesAttention.apply(q, k, v, backend, docs, scale)


def test_tokenwise_does_not_depend_on_what_the_core_saves_or_its_order(monkeypatch):
    """A core that saves (lse, v, view of out, extra, q, extra, k): the executor takes out and lse
    from the call, q/k/v from its own arguments, and offloads the extras whole. Bit-equal to plain
    with the default core, and the extras' bytes (not recomputable) are in the host tier."""
    model = tiny_model("llama", torch.float64)  # GQA: 4 query heads, 2 kv heads
    ids, pos = batch(2, 37, packed=True)
    ref = step(model, ids, pos, {"mode": "none"})
    default_bytes = {}
    for alpha in ALPHAS:
        step(model, ids, pos, tokenwise(alpha))
        default_bytes[alpha] = activation_stats(model)["host_bytes"]
    monkeypatch.setattr(adapter_mod, "attention", shuffled_attention)
    assert_identical(step(model, ids, pos, {"mode": "none"}), ref, "shuffled core, plain")
    parts, t, n_off = model.layer_parts[0], 2 * 37, 3
    extra_bytes = n_off * (t * parts.n_heads * parts.head_dim + 3) * 8  # k_rep + state, float64
    for alpha in ALPHAS:
        assert_identical(step(model, ids, pos, tokenwise(alpha)), ref, f"shuffled core alpha={alpha}")
        assert activation_stats(model)["host_bytes"] == default_bytes[alpha] + extra_bytes, alpha


def test_bf16_weights_equal_plain():
    """A bf16 model (no autocast): the RMSNorm float32 upcast is saved next to bf16 tensors."""
    model = tiny_model("qwen2", torch.bfloat16)
    ids, pos = batch(2, 37, packed=True)
    ref = step(model, ids, pos, {"mode": "none"})
    for alpha in (0.0, 0.77):
        assert_identical(step(model, ids, pos, tokenwise(alpha)), ref, f"bf16 weights alpha={alpha}")


@pytest.mark.parametrize(
    "frozen",
    [
        "embed_tokens",  # layer 0's input needs no gradient: the rerun must not save more than forward
        "embed_tokens|self_attn",  # nor its attention output
        "_proj",  # only norms train (adapter-style fine-tuning)
    ],
)
def test_tokenwise_with_frozen_parameters_equals_plain(frozen):
    model = tiny_model()
    for name, p in model.named_parameters():
        if any(part in name for part in frozen.split("|")):
            p.requires_grad_(False)
    ids, pos = batch(2, 37, packed=True)

    def run(activation):
        apply_activation_memory(model, activation)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, position_ids=pos)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads

    ref = run({"mode": "none"})
    assert 0 < len(ref[1]) < len(list(model.parameters()))
    for alpha in (0.0, 0.3):
        assert_identical(run(tokenwise(alpha)), ref, f"frozen {frozen} alpha={alpha}")
        model.layer_executor.close()


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"mode": "tokenwise", "alpha": 1.5}, "activation.alpha"),
        ({"mode": "tokenwise", "alpha": -0.1}, "activation.alpha"),
        ({"mode": "tokenwise", "alpha": "fast"}, "activation.alpha"),
        ({"mode": "tokenwise", "alpha": True}, "activation.alpha"),
        ({"mode": "swap"}, "activation.mode"),
        ({"mode": "tokenwise", "tier": "ssd"}, "activation.tier"),
        ({"mode": "tokenwise", "keep_last": -1}, "activation.keep_last"),
        ({"mode": "tokenwise", "host_budget_bytes": 0}, "activation.host_budget_bytes"),
        ({"mode": "tokenwise", "trim_heap": "yes"}, "activation.trim_heap"),
        ({"mode": "tokenwise", "tier": "file"}, "activation.file_dir"),
        ({"mode": "tokenwise", "alpah": 0.5}, "alpah"),
    ],
)
def test_bad_activation_config_names_the_key(cfg, key):
    model = tiny_model(layers=1)
    before = model.layer_executor
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_activation_memory(model, cfg)
    assert model.layer_executor is before, "a rejected config must leave the model as it was"


def test_alpha_is_normalised_to_float():
    assert ActivationConfig(mode="tokenwise", alpha=1).alpha == 1.0
    assert isinstance(ActivationConfig(mode="tokenwise", alpha=0).alpha, float)


def test_unsupported_model_family_names_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32))
    with pytest.raises(ValueError, match=r"model\.family"):
        apply_activation_memory(gpt2, tokenwise(0.5))


# ------------------------------------------------------------------------------------ the trainer


def _train(out_dir, *overrides):
    from longtrain.trainer.compose import compose
    from longtrain.trainer.train import train

    cfg = compose(
        "tiny_cpu",
        [
            "activation.mode=tokenwise",
            "activation.alpha=0.5",
            "train.steps=4",
            "train.seq_len=128",
            "train.log_every=1",
            "train.dtype=float64",
            "optim.warmup_steps=1",
            "data.micro_batch_size=2",
            "logging.progress=false",
            f"output_dir={out_dir}",
            "checkpoint.every=2",
            *overrides,
        ],
    )
    return train(cfg)


def test_trainer_tokenwise_logs_stats_and_matches_plain(tmp_path):
    """tiny_cpu (hidden 128, 4 layers, keep_last 1, grad_accum 2), fp64: tokenwise losses == mode=none
    losses; metrics.jsonl carries the executor's statistics with the analytic values."""
    logged = _train(tmp_path / "tokenwise")
    plain = _train(tmp_path / "plain", "activation.mode=none")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    for m, p in zip(logged, plain, strict=True):
        assert abs(m["loss"] - p["loss"]) <= 1e-10, (m["step"], m["loss"], p["loss"])
    assert logged[-1]["loss"] < logged[0]["loss"]  # it trains

    lines = [json.loads(line) for line in (tmp_path / "tokenwise" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    # tiny_cpu: h=128, 4 heads of 32, 2 kv heads, ffn 352; t = 2 rows * 128 = 256, a = 128, 3 offloaded
    h, nh, kv, d, ffn, t, a, n_off, e = 128, 4, 2, 32, 352, 256, 128, 3, 8
    whole = h * e + nh * d * e + nh * e
    rows = 2 * (4 * h + 4 + 2 * e * h) + e * d * (nh + 2 * kv) + 4 * e * ffn  # see test_tokenwise.py
    plain_layer = t * (rows + whole - e * h)  # the plain model saves the float32 copy of x, not x
    staging = t * (whole + rows)  # a > 0: whole tensors + full row tensors until their copies land
    for line in lines:
        assert line["recomputed_rows"] == n_off * (t - a)
        assert line["host_bytes"] == n_off * (t * whole + a * rows)
        assert line["file_bytes"] == 0
        # keep_last=1 layer held + two offloaded layers in flight + one rebuilt (test_tokenwise.py)
        assert plain_layer <= line["device_peak_bytes"] <= plain_layer + 2 * staging + t * (whole + rows)


class SimulatedCrash(Exception):
    pass


def test_trainer_tokenwise_resumes_after_crash(tmp_path, monkeypatch):
    """Crash in step 3 (after the step-2 checkpoint), train again: steps 3-4 equal an uninterrupted run."""
    from longtrain.trainer.train import Job

    full = _train(tmp_path / "full")

    original = Job.train_step
    calls = {"n": 0}

    def crashing(self, micro_batches):
        calls["n"] += 1
        if calls["n"] == 3:
            raise SimulatedCrash("step 3")
        return original(self, micro_batches)

    monkeypatch.setattr(Job, "train_step", crashing)
    with pytest.raises(SimulatedCrash):
        _train(tmp_path / "crash")
    monkeypatch.setattr(Job, "train_step", original)
    assert (tmp_path / "crash" / "checkpoints" / "step-000002").is_dir()
    resumed = _train(tmp_path / "crash")
    assert [m["step"] for m in resumed] == [3, 4]
    for m, f in zip(resumed, full[2:], strict=True):
        assert m["loss"] == f["loss"], (m["step"], m["loss"], f["loss"])
        assert m["host_bytes"] == f["host_bytes"] and m["recomputed_rows"] == f["recomputed_rows"]

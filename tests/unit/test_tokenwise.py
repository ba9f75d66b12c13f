"""Token-wise swap/recompute (MEMO): what goes to the host tier, what stays on the device, what is
recomputed, and how it fails. Gradient equality with the plain model is in test_activation_modes.py.

Oracles:
* bytes: ``skeletal_bytes_per_token`` (tests/saved_bytes.py), derived by hand from what HF's modules save for
  backward; it also predicts the plain model's saved bytes, counted with saved_tensors_hooks;
* device bytes: a bound from the schedule (kept layers + two offloaded layers in flight + one
  rebuilt layer), next to the plain model's saved bytes;
* recompute: ``FlopCounterMode``; the extra FLOPs of tokenwise over plain are exactly the matmuls
  of the row-wise parts of each offloaded layer on its t - a dropped rows, and zero attention;
* the file tier: the host tier's gradients; injected short reads/writes and a truncated file
  raise (never silently wrong gradients).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from saved_bytes import dims, plain_layer_bytes_per_token, skeletal_bytes_per_token
from tiny import tiny_adapted_model
from torch.utils.flop_counter import FlopCounterMode

from longtrain.offload import (
    activation_stats,
    apply_activation_memory,
    cost,
    heap,
    parameter_storages,
    profile,
    store,
)
from longtrain.trainer.model.adapter import PlainExecutor, run_layer

VOCAB = 101


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_model(family="llama", dtype=torch.float64, **kw):
    """hidden 64, 4 query heads sharing 2 kv heads (GQA), random biases and norm weights."""
    return tiny_adapted_model(family, dtype, vocab=VOCAB, **kw)


def ids_of(t, b=1, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def tokenwise(alpha, keep_last=1, **kw):
    return {"mode": "tokenwise", "alpha": alpha, "keep_last": keep_last, **kw}


def forward_backward(model, ids, activation=None, position_ids=None):
    """(loss, grads, stats after forward, stats after backward)."""
    if activation is not None:
        apply_activation_memory(model, activation)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, position_ids=position_ids)
    after_forward = activation_stats(model)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), grads, after_forward, activation_stats(model)


def close(model):
    model.layer_executor.close()


def assert_grads_equal(got, ref):
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


# ------------------------------------------------------------------------------ the byte formula


class CountingExecutor(PlainExecutor):
    """The plain executor, counting each layer's distinct saved storages (no params, no RoPE tables)."""

    def __init__(self, model):
        self.params = parameter_storages(model)
        self.per_layer: list[int] = []

    def __call__(self, layers, x_th, ctx):
        skip = self.params | {
            ctx.cos_td.untyped_storage().data_ptr(),
            ctx.sin_td.untyped_storage().data_ptr(),
        }
        for parts in layers:
            seen: dict[int, int] = {}  # storage -> bytes

            def pack(t, seen=seen):
                key = t.untyped_storage().data_ptr()
                if key not in skip:
                    seen[key] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x_th = run_layer(parts, x_th, ctx)
            self.per_layer.append(sum(seen.values()))
        return x_th


def plain_saved_bytes(model, ids, position_ids=None):
    counter = CountingExecutor(model)
    model.layer_executor = counter
    model(input_ids=ids, labels=ids, position_ids=position_ids).loss.backward()
    return counter.per_layer


# fmt: off
FORMULA_CASES = {
    # id: (family, dtype, model sizes, t, alpha)
    "llama-f64-gqa": ("llama", torch.float64, dict(hidden=64, heads=4, kv_heads=2), 64, 0.3),
    "qwen2-f32-bias": ("qwen2", torch.float32, dict(hidden=48, heads=6, kv_heads=3, ffn=80), 37, 0.77),
    "llama-f32-mqa-hd8": ("llama", torch.float32, dict(hidden=64, heads=4, kv_heads=1, ffn=96, head_dim=8), 50, 0.5),
    "mistral-bf16": ("mistral", torch.bfloat16, dict(hidden=32, heads=2, kv_heads=2, ffn=40), 29, 1.0),
    "llama-f64-mha-hd12": ("llama", torch.float64, dict(hidden=40, heads=4, kv_heads=4, ffn=56, head_dim=12), 33, 0.0),
}
# fmt: on


@pytest.mark.parametrize("case", FORMULA_CASES)
def test_host_bytes_match_the_skeletal_formula(case):
    family, dtype, sizes, t, alpha = FORMULA_CASES[case]
    model = tiny_model(family, dtype, layers=4, **sizes)
    d = dims(model)
    whole, rows = skeletal_bytes_per_token(**d)
    n_off, a = 3, cost.split_row(alpha, t)
    ids = ids_of(t)

    # The formula describes what HF saves, independently of the executor's bookkeeping.
    assert plain_saved_bytes(model, ids) == [t * plain_layer_bytes_per_token(**d)] * 4

    _, _, fwd, bwd = forward_backward(model, ids, tokenwise(alpha))
    expected = n_off * (t * whole + a * rows)
    assert fwd["host_bytes"] == expected
    assert model.layer_executor.engine.store.nbytes() == expected  # what the store really holds
    assert fwd["file_bytes"] == 0
    assert fwd["offload_rows_per_layer"] == a
    assert fwd["recomputed_rows"] == n_off * (t - a)
    assert bwd["host_bytes"] == expected  # the stats stay those of the step until the next forward

    # The byte formula of cost.py and the runtime probe (profile.measure) agree with it.
    assert cost.offloaded_bytes(t * whole, t * rows, alpha, t, n_off) == expected
    x, ctx = model.layer_inputs(ids)
    prof = profile.measure(model.layer_parts, x, ctx, store.HostStore())
    assert (prof.whole_bytes_per_token, prof.row_bytes_per_token) == (whole, rows)
    close(model)


def test_host_bytes_counted_while_copies_are_in_flight(monkeypatch):
    """keep_last=0 and a slow host tier: the stats are taken when the last layers' copies have not
    landed yet; they must still report the bytes the store will hold."""
    original = store.HostStore.write

    def slow_write(self, key, src, non_blocking=False):
        time.sleep(0.01)
        return original(self, key, src, non_blocking)

    monkeypatch.setattr(store.HostStore, "write", slow_write)
    model = tiny_model(layers=3)
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t, a = 64, 48
    _, _, fwd, _ = forward_backward(model, ids_of(t), tokenwise(a / t, keep_last=0))
    assert fwd["host_bytes"] == 3 * (t * whole + a * rows)
    close(model)


# ------------------------------------------------------------------------------- device residency


def test_device_peak_is_bounded_and_far_below_plain():
    """8 layers, fp64, t=64. The executor's device accounting must stay within

        keep_last * P  +  2 * S(a)  +  (W + R)

    P: one plain layer's saved bytes (the kept layers hold those until their backward);
    S(a): one offloaded layer's staging, the whole tensors plus, when a > 0, the full row tensors
      (on CPU the copy thread reads the originals; layer i waits for layer i-2's copies, so at
      most two layers are in flight);
    W + R: one layer rebuilt for its backward (whole tensors fetched + rows reassembled).
    And it can never be below keep_last * P: those bytes are really held at the end of forward."""
    t, layers = 64, 8
    model = tiny_model(layers=layers)
    d = dims(model)
    whole, rows = (t * b for b in skeletal_bytes_per_token(**d))
    ids = ids_of(t)
    plain = plain_saved_bytes(model, ids)
    P = t * plain_layer_bytes_per_token(**d)
    assert plain == [P] * layers
    plain_total = sum(plain)
    # every layer kept: the accounting is exactly what the plain model saves
    _, _, _, stats = forward_backward(model, ids, tokenwise(0.5, keep_last=layers))
    assert stats["device_peak_bytes"] == plain_total
    for keep_last in (1, 2):
        for alpha in (0.0, 0.5, 1.0):
            _, _, _, stats = forward_backward(model, ids, tokenwise(alpha, keep_last))
            staging = whole + (rows if cost.split_row(alpha, t) else 0)
            bound = keep_last * P + 2 * staging + whole + rows
            peak = stats["device_peak_bytes"]
            assert keep_last * P <= peak <= bound, (keep_last, alpha, peak, bound)
            close(model)
            if keep_last == 1:
                assert peak < plain_total / 2, (alpha, peak, plain_total)
                if alpha == 0.0:
                    assert peak < plain_total / 5, (peak, plain_total)


# ----------------------------------------------------------------------------------- recompute


def row_wise_flops_per_token(h, n_heads, n_kv, head_dim, ffn, dtype):
    """Matmul FLOPs (2 per multiply-add) of pre-attention (q, k, v) and post-attention (o, gate, up,
    down) for one token row: what the rerun of one dropped row costs."""
    return 2 * (h * head_dim * (n_heads + 2 * n_kv) + n_heads * head_dim * h + 3 * h * ffn)


def flops(model, ids, activation):
    apply_activation_memory(model, activation)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    close(model)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("t", [64, 37])
def test_recompute_covers_only_dropped_rows_and_never_attention(t):
    """The reference attention backend computes attention with einsum (bmm), so the counter sees
    its FLOPs; full recompute repeats them (the counter is not blind), tokenwise never does."""
    layers, n_off = 4, 3
    model = tiny_model(layers=layers, backend="reference")
    d = dims(model)
    ids = ids_of(t)
    plain = flops(model, ids, {"mode": "none"})
    attention_forward = 2 * (2 * d["n_heads"] * t * t * d["head_dim"])  # scores + weighted sum
    full = flops(model, ids, {"mode": "recompute"})
    assert full["aten.bmm"] - plain["aten.bmm"] == layers * attention_forward
    for alpha in (0.0, 0.3, 0.77, 1.0):
        tw = flops(model, ids, tokenwise(alpha))
        extra = {op: tw.get(op, 0) - plain.get(op, 0) for op in set(tw) | set(plain)}
        dropped = t - cost.split_row(alpha, t)
        assert extra.get("aten.bmm", 0) == 0, extra
        assert sum(extra.values()) == n_off * dropped * row_wise_flops_per_token(**d), (alpha, extra)


# ----------------------------------------------------------------------------------- file tier


def activation_files(directory):
    return sorted(p for p in directory.iterdir() if p.name.startswith("activations-"))


def test_file_tier_matches_host_tier(tmp_path):
    model = tiny_model()
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t, alpha = 64, 0.3
    ids = ids_of(t)
    loss_h, grads_h, host, _ = forward_backward(model, ids, tokenwise(alpha))
    close(model)
    loss_f, grads_f, fwd, _ = forward_backward(
        model, ids, tokenwise(alpha, tier="file", file_dir=str(tmp_path))
    )
    assert torch.equal(loss_f, loss_h)
    assert_grads_equal(grads_f, grads_h)
    expected = 3 * (t * whole + cost.split_row(alpha, t) * rows)
    assert host["host_bytes"] == expected and host["file_bytes"] == 0
    assert fwd["file_bytes"] == expected and fwd["host_bytes"] == 0
    [path] = activation_files(tmp_path)
    assert path.stat().st_size >= expected
    close(model)
    assert activation_files(tmp_path) == []  # close() removes the file


needs_malloc_trim = pytest.mark.skipif(not heap.heap_trim_available(), reason="needs glibc malloc_trim")


@needs_malloc_trim
def test_file_tier_trims_the_heap_at_layer_boundaries_without_changing_results(tmp_path):
    model = tiny_model(layers=4)
    ids = ids_of(48)
    loss_p, grads_p, _, _ = forward_backward(model, ids, {"mode": "none"})
    loss, grads, fwd, bwd = forward_backward(
        model, ids, tokenwise(0.0, keep_last=0, tier="file", file_dir=str(tmp_path))
    )
    assert torch.equal(loss, loss_p)
    assert_grads_equal(grads, grads_p)
    assert fwd["heap_trims"] == 2  # before layers 2 and 3 (layers 0 and 1 are free by then)
    assert bwd["heap_trims"] == 2 + 4  # and before each offloaded layer's rebuild
    assert bwd["heap_trim_s"] > 0
    close(model)


@pytest.mark.parametrize(
    "cfg, trims",
    [
        ({"tier": "host"}, 0),
        ({"tier": "host", "trim_heap": True}, 2),
        ({"tier": "file", "trim_heap": False}, 0),
    ],
)
def test_trim_heap_setting(tmp_path, cfg, trims):
    if cfg.get("trim_heap") and not heap.heap_trim_available():
        pytest.skip("needs glibc malloc_trim")
    model = tiny_model(layers=3)
    _, _, _, stats = forward_backward(model, ids_of(16), tokenwise(0.5, file_dir=str(tmp_path), **cfg))
    assert stats["heap_trims"] == trims  # 2 offloaded layers: one trim before each rebuild, none in forward
    close(model)


def test_trim_heap_true_without_malloc_trim_names_the_key(monkeypatch):
    monkeypatch.setattr(heap, "_MALLOC_TRIM", None)
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=r"activation\.trim_heap"):
        apply_activation_memory(model, tokenwise(0.5, trim_heap=True))
    # auto quietly stays off where malloc_trim is missing
    assert heap.build_heap_trimmer("auto", "cpu", "file").enabled is False


def test_malloc_trim_returns_freed_heap_pages_to_the_os():
    # in a fresh process: this one's heap layout depends on every test before
    code = """
import psutil, torch
from longtrain.offload.heap import HeapTrimmer, heap_trim_available
if not heap_trim_available():
    print("skip")
    raise SystemExit
proc = psutil.Process()
blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 256 MiB of 64 KiB blocks, below the mmap threshold
fence = torch.ones(16 * 1024)  # keeps the freed blocks below the heap top: free() cannot trim them
del blocks
before = proc.memory_info().rss
HeapTrimmer(True)()
print((before - proc.memory_info().rss) / 2**20)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    if out == "skip":
        pytest.skip("needs glibc malloc_trim")
    assert float(out) > 200  # MiB handed back


def test_two_file_stores_in_one_directory_do_not_collide(tmp_path):
    """Two models with the file tier in the same directory, forwards interleaved before backwards:
    each store has its own file (a file shared by the two would let one model's writes overwrite the
    other's activations)."""
    a, b = tiny_model(), tiny_model()
    ids_a, ids_b = ids_of(64, seed=1), ids_of(64, seed=2)
    _, ref, _, _ = forward_backward(a, ids_a)
    cfg = tokenwise(0.5, tier="file", file_dir=str(tmp_path))
    apply_activation_memory(a, cfg)
    apply_activation_memory(b, cfg)
    a.zero_grad(set_to_none=True)
    loss_a = a(input_ids=ids_a, labels=ids_a).loss
    loss_b = b(input_ids=ids_b, labels=ids_b).loss
    loss_a.backward()
    loss_b.backward()
    assert_grads_equal({n: p.grad for n, p in a.named_parameters()}, ref)
    assert len(activation_files(tmp_path)) == 2
    close(a)
    close(b)


def test_short_read_raises_in_backward(tmp_path, monkeypatch):
    model = tiny_model()
    ids = ids_of(64)
    apply_activation_memory(model, tokenwise(0.5, tier="file", file_dir=str(tmp_path)))
    loss = model(input_ids=ids, labels=ids).loss
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: real(fd, buffers, offset) - 1)
    with pytest.raises(OSError, match="short read"):
        loss.backward()


def test_truncated_activation_file_raises_in_backward(tmp_path):
    """Another process (or a full disk) truncates the file between forward and backward."""
    model = tiny_model()
    ids = ids_of(64)
    apply_activation_memory(model, tokenwise(0.5, tier="file", file_dir=str(tmp_path)))
    loss = model(input_ids=ids, labels=ids).loss
    [path] = activation_files(tmp_path)
    os.truncate(path, 0)
    with pytest.raises(OSError, match="short read"):
        loss.backward()


def test_short_write_raises(tmp_path, monkeypatch):
    model = tiny_model()
    ids = ids_of(64)
    apply_activation_memory(model, tokenwise(0.5, tier="file", file_dir=str(tmp_path)))
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, data, offset) - 1)
    with pytest.raises(OSError, match="short write"):
        model(input_ids=ids, labels=ids).loss.backward()


def test_unusable_file_dir_fails_at_apply_time(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file, so no directory can be created below it")
    bad = str(blocker / "sub")
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=r"activation\.file_dir .*not writable"):
        apply_activation_memory(model, tokenwise(0.5, tier="file", file_dir=bad))
    with pytest.raises(ValueError, match=r"activation\.file_dir"):
        store.build_store("file", bad)
    with pytest.raises(ValueError, match=r"activation\.file_dir .*GiB free"):
        store.check_file_dir(tmp_path, need_bytes=2**62)
    assert store.check_file_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


@pytest.mark.parametrize("tier", ["host", "file"])
def test_bandwidth_probe_frees_its_buffer(tmp_path, tier):
    """profile.copy_bandwidth writes a probe buffer into the real store: afterwards the store holds
    only what it held before (the file tier's file shrinks back)."""
    s = store.build_store(tier, str(tmp_path))
    s.write(("kept",), torch.ones(10, dtype=torch.float64))
    assert profile.copy_bandwidth(s, 2**20, torch.device("cpu")) > 0
    assert s.nbytes() == 80
    with pytest.raises(RuntimeError, match="never offloaded"):
        s.read(("bandwidth-probe",), torch.device("cpu"))
    if tier == "file":
        assert s.path.stat().st_size == 4096  # the kept region only: the probe's MiB left the file
    s.close()


def test_host_store_release_drops_the_buffer():
    from longtrain.offload.memory import HOST_BUFFERS

    before = HOST_BUFFERS.nbytes()
    s = store.HostStore()
    s.write(("k",), torch.ones(1000))
    assert HOST_BUFFERS.nbytes() - before == 4000
    lent = s.read(("k",), torch.device("cpu"))  # read in place on a CPU device: device bytes while held
    assert torch.equal(lent, torch.ones(1000)) and HOST_BUFFERS.nbytes() == before
    del lent
    assert HOST_BUFFERS.nbytes() - before == 4000
    s.release(("k",))
    assert HOST_BUFFERS.nbytes() == before and s.nbytes() == 0


# --------------------------------------------------------------------------------- step lifecycle


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_tensor_survives_a_step(alpha):
    """Steady state: the number of live tensors does not grow from step to step (a rerun graph
    kept alive through the capture hook would leak its tensors every step)."""
    import gc

    model = tiny_model(dtype=torch.float32)
    apply_activation_memory(model, tokenwise(alpha))
    ids = ids_of(64)

    def live_after_step() -> int:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    live_after_step()
    counts = [live_after_step() for _ in range(3)]
    close(model)
    assert counts[0] == counts[1] == counts[2], counts


def test_gradient_accumulation_equals_plain():
    """Two micro-batches, forward/backward one after the other, loss normalised by the total token
    count: the accumulated gradients equal the plain model's."""
    model = tiny_model()
    batches = [ids_of(64, seed=1), ids_of(37, b=2, seed=2)]
    total = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)

    def accumulate(activation):
        apply_activation_memory(model, activation)
        model.zero_grad(set_to_none=True)
        for ids in batches:
            model(input_ids=ids, labels=ids, loss_normalizer=total).loss.backward()
        close(model)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = accumulate({"mode": "none"})
    assert_grads_equal(accumulate(tokenwise(0.3)), ref)


def test_second_forward_before_backward_raises_and_keeps_the_first_graph():
    model = tiny_model()
    ids, other = ids_of(64, seed=1), ids_of(64, seed=2)
    _, ref, _, _ = forward_backward(model, ids)
    apply_activation_memory(model, tokenwise(0.3))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="one pending backward"):
        model(input_ids=other, labels=other)
    with torch.no_grad():  # an eval forward does not save anything: allowed
        model(input_ids=other, labels=other)
    loss.backward()
    assert_grads_equal({n: p.grad for n, p in model.named_parameters()}, ref)
    # a dropped graph (no backward) does not block the next forward
    model(input_ids=other, labels=other)
    model(input_ids=ids, labels=ids).loss.backward()
    close(model)


# ------------------------------------------------------------------------------------ alpha="auto"


def test_auto_alpha_resolves_and_profiles():
    model = tiny_model()
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t = 64
    ids = ids_of(t)
    _, ref, _, _ = forward_backward(model, ids)
    _, grads, stats, _ = forward_backward(model, ids, tokenwise("auto"))
    executor = model.layer_executor
    assert isinstance(executor.alpha, float) and 0.0 <= executor.alpha <= 1.0
    assert stats["alpha"] == executor.alpha
    assert stats["offload_rows_per_layer"] == cost.split_row(executor.alpha, t)
    prof = executor.profile
    assert isinstance(prof, profile.LayerProfile)
    assert prof.layer_forward_s > 0 and prof.copy_bytes_per_s > 0
    assert (prof.whole_bytes_per_token, prof.row_bytes_per_token) == (whole, rows)
    assert_grads_equal(grads, ref)
    close(model)


def test_auto_alpha_is_recorded_and_read_back_by_a_later_process(tmp_path, monkeypatch):
    """alpha="auto" with an alpha record: the first model measures and writes the alphas of its
    length; a second model of the same job (a resumed run) reads them instead of measuring, so it
    cuts the same rows, and its loss and gradients are the first one's bit for bit."""
    path = tmp_path / "alpha.json"
    ids = ids_of(64)
    first = apply_activation_memory(tiny_model(), tokenwise("auto"), alpha_record=path)
    loss1, grads1, stats1, _ = forward_backward(first, ids)
    close(first)
    saved = json.loads(path.read_text())
    assert saved["alphas"]["64"][0] == stats1["alpha"]
    # what the second process would measure differs (another machine's load): make it differ
    saved["alphas"]["64"] = [
        0.25 if a != "auto" and i < 3 else a for i, a in enumerate(saved["alphas"]["64"])
    ]
    path.write_text(json.dumps(saved))
    measured = []
    monkeypatch.setattr(
        profile, "measure", lambda *a, **k: measured.append(1) or pytest.fail("measured again")
    )
    second = apply_activation_memory(tiny_model(), tokenwise("auto"), alpha_record=path)
    _, _, stats2, _ = forward_backward(second, ids)
    assert stats2["alpha"] == 0.25 and stats2["offload_rows_per_layer"] == 16 and not measured
    close(second)
    # the same alphas as recorded: the same floats
    saved["alphas"]["64"] = [
        stats1["alpha"] if a != "auto" and i < 3 else a for i, a in enumerate(saved["alphas"]["64"])
    ]
    path.write_text(json.dumps(saved))
    third = apply_activation_memory(tiny_model(), tokenwise("auto"), alpha_record=path)
    loss3, grads3, _, _ = forward_backward(third, ids)
    assert torch.equal(loss3, loss1)
    assert_grads_equal(grads3, grads1)
    close(third)


def test_an_alpha_record_of_another_job_is_measured_over(tmp_path):
    """A record written for another plan (here another tier budget) is not read: the alphas are
    measured and the file rewritten for this job."""
    path = tmp_path / "alpha.json"
    model = apply_activation_memory(
        tiny_model(), tokenwise("auto", host_budget_bytes=2**40), alpha_record=path
    )
    forward_backward(model, ids_of(64))
    close(model)
    saved = json.loads(path.read_text())
    saved["alphas"]["64"] = [0.25 if a != "auto" else a for a in saved["alphas"]["64"]]
    path.write_text(json.dumps(saved))
    model = apply_activation_memory(
        tiny_model(), tokenwise("auto", host_budget_bytes=2**41), alpha_record=path
    )
    _, _, stats, _ = forward_backward(model, ids_of(64))
    close(model)
    assert model.layer_executor.profile is not None  # measured
    rewritten = json.loads(path.read_text())
    assert rewritten["for"]["plan"]["host_budget_bytes"] == 2**41
    assert rewritten["alphas"]["64"][0] == stats["alpha"]


def test_auto_alpha_respects_the_host_budget(monkeypatch):
    """A link fast enough to hide any copy: alpha is memory-bound and the host bytes fit the budget.
    The budget allows 31.6 rows per layer; rounding alpha * t to 32 rows (a tile boundary) would
    overrun it, so alpha is cut to 31 rows and the executor offloads the tile below, 24 rows."""
    monkeypatch.setattr(profile, "copy_bandwidth", lambda *args, **kwargs: 1e18)
    model = tiny_model()
    whole, rows = skeletal_bytes_per_token(**dims(model))
    t, n_off = 64, 3
    budget = int(n_off * (t * whole + 31.6 * rows))
    _, _, stats, _ = forward_backward(model, ids_of(t), tokenwise("auto", host_budget_bytes=budget))
    assert stats["alpha"] == 31 / t
    assert stats["offload_rows_per_layer"] == 24
    assert stats["host_bytes"] == n_off * (t * whole + 24 * rows) <= budget
    close(model)


def test_auto_alpha_raises_when_the_whole_tensors_do_not_fit():
    model = tiny_model()
    whole, _ = skeletal_bytes_per_token(**dims(model))
    t = 64
    apply_activation_memory(model, tokenwise("auto", host_budget_bytes=3 * t * whole - 1))
    with pytest.raises(ValueError, match=r"activation\.host_budget_bytes"):
        model(input_ids=ids_of(t), labels=ids_of(t))
    close(model)


@pytest.mark.parametrize(
    "args, expected",
    [
        # (whole, rows, T_layer s, bandwidth B/s, n_offloaded, budget): alpha
        ((100, 1000, 1.0, 600.0, 4, 10**9), 0.5),  # time-bound: (600 - 100) / 1000
        ((100, 1000, 1.0, 10.0**9, 4, 4 * 350), 0.25),  # memory-bound: (1400 / 4 - 100) / 1000
        ((100, 1000, 1.0, 600.0, 4, 4 * 350), 0.25),  # both bind: the smaller wins
        ((100, 1000, 1.0, 50.0, 4, 10**9), 0.0),  # even the whole tensors miss the time: clamp at 0
        ((100, 1000, 10.0, 10.0**9, 4, 10**9), 1.0),  # plenty of both: clamp at 1
        ((100, 1000, 1.0, 600.0, 0, 1), 1.0),  # nothing offloaded
        ((100, 0, 1.0, 600.0, 4, 10**9), 1.0),  # no row tensors
    ],
)
def test_tokenwise_alpha(args, expected):
    assert math.isclose(cost.tokenwise_alpha(*args), expected, abs_tol=1e-12)


def test_tiled_alpha_offloads_every_row_or_none():
    """A tiled layer hides little of a row's copy (cost.py): offloading all rows costs their write,
    the part of their read longer than their recompute, and on a CPU device the CPU's two copies.
    Here the rows' row-wise forward (their recompute) takes 1 s and the layer's 4 s: a link that
    writes the rows in 0.5 s with a 4000 B/s host copy costs 0.5 + 0 + 0.5 = 1.0 s, not less than
    the recompute (alpha 0); a 0.25 s link costs 0.75 s (alpha 1, capped by the budget where one
    is set); a 2 s link 3 s (alpha 0). Untiled, the layer-level rule applies (its forward hides the
    copies: alpha 1)."""
    args = dict(whole_bytes=0, row_bytes=1000, layer_forward_s=4.0, n_offloaded=1, host_budget_bytes=10**9)
    tiled = dict(tiles=4, rowwise_forward_s=1.0, host_copy_bytes_per_s=4000.0)
    assert cost.row_offload_seconds(1000, 1.0, 2000.0, 4000.0) == pytest.approx(1.0)
    assert cost.tokenwise_alpha(copy_bytes_per_s=2000.0, **args, **tiled) == 0.0
    assert cost.row_offload_seconds(1000, 1.0, 4000.0, 4000.0) == pytest.approx(0.75)
    assert cost.tokenwise_alpha(copy_bytes_per_s=4000.0, **args, **tiled) == 1.0
    assert (
        cost.tokenwise_alpha(copy_bytes_per_s=4000.0, **{**args, "host_budget_bytes": 250}, **tiled) == 0.25
    )
    assert cost.row_offload_seconds(1000, 1.0, 500.0, None) == pytest.approx(3.0)  # a GPU: no CPU copy
    assert (
        cost.tokenwise_alpha(copy_bytes_per_s=500.0, **args, **{**tiled, "host_copy_bytes_per_s": None})
        == 0.0
    )
    assert cost.tokenwise_alpha(copy_bytes_per_s=500.0, **args) == 1.0


def test_tokenwise_alpha_raises_when_whole_tensors_exceed_the_budget():
    with pytest.raises(ValueError, match=r"activation\.host_budget_bytes"):
        cost.tokenwise_alpha(100, 1000, 1.0, 600.0, 4, 399)
    assert cost.tokenwise_alpha(100, 1000, 1.0, 600.0, 4, 400) == 0.0  # exactly fits: alpha 0


def test_split_row_cuts_on_a_tile_boundary():
    """Rows are cut at round(alpha * t) rounded down to a multiple of ROW_ALIGN; alpha 1 keeps all."""
    assert cost.ROW_ALIGN == 8
    assert [cost.split_row(alpha, 37) for alpha in (0.0, 0.3, 0.77, 0.99, 1.0)] == [0, 8, 24, 37, 37]
    assert [cost.split_row(alpha, 64) for alpha in (0.1, 0.5, 0.97)] == [0, 32, 56]
    for t in (1, 7, 8, 9, 100):
        for alpha in (0.0, 0.25, 0.5, 0.9, 1.0):
            a = cost.split_row(alpha, t)
            assert 0 <= a <= round(alpha * t) and (a == t or a % cost.ROW_ALIGN == 0), (alpha, t, a)


def test_offloaded_bytes():
    # 3 layers, t = 37 rows, a = round(0.5 * 37) = 18 (round half to even), cut down to a tile: 16
    assert cost.offloaded_bytes(37 * 10, 37 * 100, 0.5, 37, 3) == 3 * (370 + 16 * 100)
    assert cost.offloaded_bytes(37 * 10, 37 * 100, 0.0, 37, 3) == 3 * 370
    assert cost.offloaded_bytes(37 * 10, 37 * 100, 1.0, 37, 0) == 0

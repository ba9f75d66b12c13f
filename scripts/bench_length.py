"""The longest sequence on one device: longtrain against the ALST single-device stack (issue 10).

    python scripts/bench_length.py --quick   # hidden 128, intermediate 448, 4/2 heads, 16 layers, 0.75 GiB
    python scripts/bench_length.py           # hidden 512, intermediate 1792, 8/4 heads, 16 layers, 1.5 GiB
    python scripts/bench_length.py --search-layers 32   # the length search on a 32-layer model

``--quick`` keeps the keys and the method and aims at < 10 minutes on 2 idle cores; the full run
takes hours (one step at 12K tokens is 2-3 minutes here and the search probes reach past the ALST
stack's longest sequence). ``--tile-rows`` (default ``auto``, ours' memory rule: the largest tile
whose MLP intermediates hold no more than the layer input, at least 256 rows) is ours'
``activation.tile_rows``.

Systems (same weights, same random tokens, fp32, batch 1, one document, 2 torch threads each, each
in its own process):

    alst         the ALST single-device stack from its real parts (below)
    checkpoint   torch.utils.checkpoint per layer             activation.mode=recompute
    ours_memory  tokenwise, file tier (O_DIRECT), alpha 0, keep_last 0, tile_rows=--tile-rows
    ours_auto    tokenwise, host tier, alpha auto, keep_last 0, tile_rows=--tile-rows

The ALST stack (DeepSpeed/ArcticTraining's recipe on one device, built by ``build_alst``):

* the plain HF ``LlamaForCausalLM``, built as ``trainer/model/hf.py`` builds ours (same seed, so
  the same weights), with HF's attention ``sdpa`` (torch's scaled_dot_product_attention, causal,
  no mask tensor: its CPU flash kernel); ours runs its ``cpu_flash`` backend;
* HF's per-layer activation checkpointing, non-reentrant (``activation_checkpointing_enable``,
  the name transformers 5 gives ``gradient_checkpointing_enable``). ALST moves the checkpointed
  hidden states to host memory; on a CPU device they already are in host memory, so that part is
  a no-op here and is left out;
* DeepSpeed's ``TiledMLP`` (``deepspeed.runtime.sequence_parallel.ulysses_sp``) on every layer's
  MLP, with ArcticTraining's shard rule ceil(seq / hidden) (one process: no all-reduce of the
  count). ArcticTraining replaces ``LlamaMLP.forward`` on the class; here the same forward is bound
  to each layer's ``mlp`` instance, so an unpatched model in the same process stays unpatched;
* DeepSpeed's ``TiledFusedLogitsLoss`` on the final hidden states (``model.model(...)`` then the
  tiled loss: the full logits never exist), each shard's summed cross-entropy divided by the
  token count inside the shard function (see ``tiled_loss`` for why not after). Its shards have
  ``--loss-chunk-rows`` rows (default 1024), the chunk ours' chunked cross-entropy is given too
  (ArcticTraining sizes shards at 1 GiB of fp32 logits, at this vocabulary 64K rows: one shard,
  so the loss's transient would grow with every length measured);
* no ZeRO-3 / optimizer offload: one process, and the benchmark measures one forward+backward.

Fairness, the same for every system:

* Allocator policy: every worker gets the same environment and imports the same modules
  (DeepSpeed's included), so the fixed footprints differ only by what each system builds. With
  ``--allocator fixed`` (default) every worker runs with ``MALLOC_MMAP_THRESHOLD_=131072``: blocks
  from 128 KiB up are mmapped and unmapped when freed, so peak RSS follows the bytes in use (glibc's
  default raises the threshold after the first large free, and then RSS measures what the heap
  keeps as much as what a system holds). Under both policies every system also trims the heap at
  every layer boundary (our systems with ``activation.trim_heap=true``; ALST with the same trimmer
  on HF's layers: a forward pre-hook before every layer after the first, and a hook on each layer
  output's gradient, where that layer's backward starts, as ``offload/recompute.py``'s baselines
  do). ``--allocator trim``: the trims only, glibc's dynamic threshold.
* Memory per token: each system's peak RSS during one step above its RSS after building (before
  its first step), at ``--slope-lengths`` (>= 3, each in a fresh process, none below the loss
  chunk, whose transient is then the same at every length); the slope of a linear least-squares
  fit is the growth per token, the intercept the per-step fixed part (gradients, one loss chunk).
* Longest sequence: one training step per length, each in a fresh process, doubling until a length
  does not fit (no cap), then bisection to ``--resolution``; the doubling starts at half the length
  where the system's slope fit reaches the budget (fewer short probes; from ``--search-start`` when
  that guess is over); a length fails when the process's peak
  RSS passes ``--budget-gib`` (a watchdog stops it early). The true answer lies in
  [max_len, max_len + resolution), so a ratio's interval is the range that allows.
* Time: the processes of one comparison stay alive together and step in turn (the starting
  system rotates each round); after one warm-up step each, the step counts are fixed by the
  command line. Ratios are medians of per-round paired ratios with a distribution-free interval for
  the median (``bench_common.paired``); "hit" when the interval lies on the target's side, "at the
  threshold" when it spans it, "miss" otherwise.
* Emulated link (``activation.link_gbps``): ours on the host tier at alpha in {0, .25, .5, .75, 1}
  and alpha auto, at ``--sweep-len``. ``--link-gbps calibrate`` (default) measures one layer
  (``offload.measure``: forward time, whole and row bytes) and picks the bandwidth at which the
  copy of alpha 0.5 takes as long as the layer's forward, so that neither end should be fastest;
  the report says whether that held. ``auto_vs_best_alpha`` is auto's median step over the fastest
  sweep median; its verdict uses the interval of auto's per-round ratio to that alpha.

The last stdout line is a JSON object: the five ratios, their verdicts and raw numbers under
"detail". ``--tile-rows 0`` runs ours untiled.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import MethodType
from typing import Any

from bench_common import (
    ask,
    code_version,
    emit,
    gib,
    paired,
    peak_rss,
    print_result,
    read,
    search_lengths,
    spawn,
    start_rss_watchdog,
    table_header,
)

VOCAB = 4096
TORCH_THREADS = 2
SWEEP_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SLOPE_SYSTEMS = ("alst", "checkpoint", "ours_memory", "ours_auto")
SEARCH_SYSTEMS = ("alst", "checkpoint", "ours_memory")
TIME_SYSTEMS = ("alst", "ours_memory")
# (comparison, bound) per headline ratio, ours / peer
TARGETS: dict[str, tuple[str, float]] = {
    "max_len_vs_alst": (">=", 1.5),
    "max_len_vs_checkpoint": (">=", 2.0),
    "time_vs_alst": ("<=", 0.85),
    "auto_vs_best_alpha": ("<=", 1.05),
    "mem_per_token_vs_alst": ("<=", 0.67),
}
FULL_MODEL = {"hidden": 512, "intermediate": 1792, "heads": 8, "kv_heads": 4, "layers": 16}
# quick: the full model's 16 layers at a quarter of its width, so the two terms the systems trade
# (ALST keeps every layer's input; ours keeps one layer's transient) weigh as in the full model
QUICK_MODEL = {"hidden": 128, "intermediate": 448, "heads": 4, "kv_heads": 2, "layers": 16}
# glibc serves blocks from this size up with their own mmap and unmaps them on free, so RSS follows
# the bytes in use instead of what the heap kept (the reference measurement fixed it too)
MMAP_THRESHOLD = 128 * 1024


def activation_cfg(system: str, tile_rows: int | str, file_dir: str, link_gbps: float | None = None) -> dict:
    """longtrain's ``activation.*`` keys of one of our systems; ``sweep_<alpha>`` and ``sweep_auto``
    are the host tier behind the emulated link."""
    common = {"trim_heap": True}
    if system == "checkpoint":
        return {"mode": "recompute", **common}
    tokenwise = {"mode": "tokenwise", "keep_last": 0, "tile_rows": tile_rows, **common}
    if system == "ours_memory":
        return {**tokenwise, "tier": "file", "alpha": 0.0, "file_dir": file_dir}
    if system == "ours_auto":
        return {**tokenwise, "tier": "host", "alpha": "auto"}
    if system.startswith("sweep_"):
        alpha = system.removeprefix("sweep_")
        return {
            **tokenwise,
            "tier": "host",
            "alpha": alpha if alpha == "auto" else float(alpha),
            "link_gbps": link_gbps,
        }
    raise ValueError(f"unknown system {system!r}")


# ------------------------------------------------------------------------------------ the ALST stack
def _mlp_forward(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def tiled_mlp_forward(self, x_bsh):
    """ArcticTraining's tiled ``LlamaMLP.forward``: DeepSpeed's TiledMLP over ceil(seq / hidden)
    sequence shards (each shard's intermediates live only inside it, and backward recomputes it)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    seq, hidden = x_bsh.shape[-2], x_bsh.shape[-1]
    shards = max(1, math.ceil(seq / hidden))
    compute_params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
    return TiledMLP.apply(_mlp_forward, self, x_bsh, shards, compute_params)


def patch_tiled_mlp(hf_model) -> None:
    for layer in hf_model.model.layers:
        layer.mlp.forward = MethodType(tiled_mlp_forward, layer.mlp)


def tiled_loss(hf_model, hidden_bsh, labels_bs, chunk_rows: int):
    """DeepSpeed's TiledFusedLogitsLoss over shards of ``chunk_rows`` rows: mean next-token loss.

    TiledFusedLogitsLoss runs each shard's backward inside its forward with an incoming gradient of
    1 and later scales only the hidden states' gradient by the real one, so lm_head's gradient is
    that of the value it returns. Each shard's loss is therefore divided by the token count inside
    ``fn`` (the output is the mean itself); dividing the returned sum afterwards, as ArcticTraining's
    trainer does, leaves lm_head's gradient num_tokens times too large."""
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    from longtrain.trainer.model.adapter import shift_labels
    from longtrain.trainer.model.loss import IGNORE_INDEX

    targets_bs = shift_labels(labels_bs)
    num_tokens = max(int((targets_bs != IGNORE_INDEX).sum()), 1)

    def shard_loss(model, x_th, y_t):
        logits_tv = model.lm_head(x_th)
        return F.cross_entropy(logits_tv, y_t, ignore_index=IGNORE_INDEX, reduction="sum") / num_tokens

    shards = max(1, math.ceil(hidden_bsh.shape[0] * hidden_bsh.shape[1] / chunk_rows))
    return TiledFusedLogitsLoss.apply(
        shard_loss, hf_model, hidden_bsh, targets_bs, None, shards, [hf_model.lm_head.weight], "sum"
    )


class AlstStack:
    """The ALST single-device stack on an HF causal LM (see the module docstring); ``loss`` runs
    the forward, ``stats`` reports the heap trims of the last step."""

    def __init__(self, hf_model, trim_heap: bool, loss_chunk_rows: int):
        from longtrain.offload.heap import HeapTrimmer

        self.hf = hf_model
        self.loss_chunk_rows = loss_chunk_rows
        self.trim_heap = HeapTrimmer(trim_heap)
        hf_model.config._attn_implementation = "sdpa"
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        patch_tiled_mlp(hf_model)
        hf_model.train()
        # HF checkpoints a layer's forward inside its module call, so these hooks run once per
        # step (not again in the recompute), at the boundaries offload/recompute.py trims at
        for i, layer in enumerate(hf_model.model.layers):
            if i:
                layer.register_forward_pre_hook(self._trim_before_layer)
            layer.register_forward_hook(self._trim_when_backward_starts)

    def _trim_before_layer(self, module, args) -> None:
        self.trim_heap()  # the previous layer's transient tensors are free now

    def _trim_when_backward_starts(self, module, args, output) -> None:
        if self.trim_heap.enabled and output.requires_grad:
            output.register_hook(lambda grad: self.trim_heap())

    def loss(self, ids_bs, position_ids_bs):
        self.trim_heap.reset()
        hidden_bsh = self.hf.model(input_ids=ids_bs, position_ids=position_ids_bs, use_cache=False)
        return tiled_loss(self.hf, hidden_bsh.last_hidden_state, ids_bs, self.loss_chunk_rows)

    def parameters(self):
        return self.hf.parameters()

    def zero_grad(self) -> None:
        self.hf.zero_grad(set_to_none=True)

    def stats(self) -> dict[str, float]:
        return {"heap_trims": self.trim_heap.calls, "heap_trim_s": self.trim_heap.seconds}

    def close(self) -> None:
        """Nothing to release."""


class Ours:
    """longtrain's adapted model with an activation config; the same interface as AlstStack."""

    def __init__(self, lm):
        self.lm = lm

    def loss(self, ids_bs, position_ids_bs):
        return self.lm(input_ids=ids_bs, labels=ids_bs, position_ids=position_ids_bs).loss

    def parameters(self):
        return self.lm.parameters()

    def zero_grad(self) -> None:
        self.lm.zero_grad(set_to_none=True)

    def stats(self) -> dict[str, float]:
        from longtrain.offload import activation_stats

        return activation_stats(self.lm)

    def close(self) -> None:
        self.lm.layer_executor.close()  # the file tier deletes its file


# ------------------------------------------------------------------------------------ worker side
def build_hf(spec: dict, seq_len: int):
    """The HF model every system starts from: seed 0, fp32, as trainer/model/hf.py builds it."""
    import torch

    from longtrain.trainer.config import ModelConfig
    from longtrain.trainer.model.hf import build_hf_model

    torch.manual_seed(0)
    sizes = ModelConfig(
        family="llama",
        hidden_size=spec["hidden"],
        num_layers=spec["layers"],
        num_heads=spec["heads"],
        num_kv_heads=spec["kv_heads"],
        intermediate_size=spec["intermediate"],
        vocab_size=VOCAB,
    )
    return build_hf_model(sizes, vocab_size=VOCAB, seq_len=seq_len, dtype=torch.float32)


def build_system(system: str, spec: dict, seq_len: int, activation: dict | None, loss_chunk_rows: int):
    """(the system, the token ids [1, seq_len]); ``activation`` is None for alst. Both losses walk
    the rows in chunks of ``loss_chunk_rows``."""
    import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401  (every worker imports the same)
    import torch

    from longtrain.offload import apply_activation_memory
    from longtrain.trainer.model.adapter import adapt

    torch.set_num_threads(TORCH_THREADS)
    hf = build_hf(spec, seq_len)
    model: AlstStack | Ours
    if system == "alst":
        model = AlstStack(hf, trim_heap=True, loss_chunk_rows=loss_chunk_rows)
    else:
        lm = apply_activation_memory(adapt(hf, "cpu_flash"), activation)
        lm.loss_chunk_rows = loss_chunk_rows
        model = Ours(lm)
    ids_bs = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids_bs


def reset_step_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs), so ``step_peak``
    sees the step's peak, not the build's; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_peak() -> int:
    """Peak RSS since ``reset_step_peak`` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def _step(model, ids_bs) -> dict:
    import resource

    import torch

    position_ids = torch.arange(ids_bs.shape[1])[None]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loss = model.loss(ids_bs, position_ids)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.zero_grad()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "fwd_s": t1 - t0,
        "bwd_s": t2 - t1,
        "step_s": t2 - t0,
        "loss": loss.detach().item(),
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
    }


def probe(job: dict) -> None:
    """One training step at one length: the step's peak RSS above the RSS after building; with a
    budget, also whether the whole process's peak stayed within it (a watchdog stops it early)."""
    import psutil

    budget = job.get("budget")
    if budget is not None:
        start_rss_watchdog(budget)
    model, ids_bs = build_system(
        job["system"], job["spec"], job["seq_len"], job["activation"], job["loss_chunk_rows"]
    )
    rss_built = psutil.Process().memory_info().rss
    exact = reset_step_peak()
    step = _step(model, ids_bs)
    peak, peak_step = peak_rss(), step_peak()
    stats = model.stats()
    model.close()
    out = {"rss": peak, "rss_built": rss_built, "step_peak": peak_step, "step_peak_exact": exact, **step}
    emit({**out, "fits": budget is None or peak <= budget, "activation": stats})


def worker(job: dict) -> None:
    """Timing worker: build, then one command per stdin line: step (timed), done."""
    import psutil

    model, ids_bs = build_system(
        job["system"], job["spec"], job["seq_len"], job["activation"], job["loss_chunk_rows"]
    )
    emit({"event": "ready", "rss_built": psutil.Process().memory_info().rss})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        emit({"event": "step", **_step(model, ids_bs)})
    stats = model.stats()
    model.close()
    emit({"event": "done", "peak_rss": peak_rss(), "activation": stats})


def calibrate_link(job: dict) -> None:
    """One layer of ours measured at the sweep length (``offload.measure``, no link): its forward
    time (the fastest of three after a cold one) and the bytes alpha offloads."""
    import torch

    from longtrain.offload import measure
    from longtrain.offload.store import HostStore

    model, ids_bs = build_system(
        "ours_auto", job["spec"], job["seq_len"], job["activation"], job["loss_chunk_rows"]
    )
    lm = model.lm
    with torch.no_grad():
        x_th, ctx = lm.layer_inputs(ids_bs, torch.arange(ids_bs.shape[1])[None])
    x_th = x_th.detach().requires_grad_()
    # the first measurement is cold (first-touch allocations, kernel setup); of the next three the
    # fastest forward is the one least disturbed by other load on the machine
    profiles = [measure(lm.layer_parts, x_th, ctx, HostStore()) for _ in range(4)]
    prof = profiles[-1]
    model.close()
    emit(
        {
            "layer_forward_s": min(p.layer_forward_s for p in profiles[1:]),
            "layer_forward_s_all": [p.layer_forward_s for p in profiles],
            "whole_bytes_per_token": prof.whole_bytes_per_token,
            "row_bytes_per_token": prof.row_bytes_per_token,
            "copy_bytes_per_s": prof.copy_bytes_per_s,
        }
    )


# ------------------------------------------------------------------------------------ pure pieces
def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = slope * x + intercept, and R^2 (1.0 for an exact fit)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs >= 2 distinct x values, got {xs}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def bound_verdict(
    value: float, target: tuple[str, float], low: float | None = None, high: float | None = None
) -> str:
    """hit / at the threshold / miss of ``value`` (or of the interval [low, high] when given)
    against (">=" or "<=", bound)."""
    op, bound = target
    lo = value if low is None else low
    hi = value if high is None else high
    if lo <= bound <= hi and lo != hi:
        return "at the threshold"
    ok = lo >= bound if op == ">=" else hi <= bound
    return "hit" if ok else "miss"


def max_len_ratio(ours: dict, peer: dict, resolution: int, target: tuple[str, float]) -> dict:
    """ours / peer longest length; each true answer lies in [max_len, max_len + resolution) (or
    beyond max_len when the search found no failing length)."""
    o, p = ours["max_len"], peer["max_len"]
    if p == 0:
        return {"value": math.inf, "low": math.inf, "high": math.inf, "verdict": "hit" if o else "miss"}
    low = o / (p + resolution) if not peer["unbounded"] else 0.0
    high = (o + resolution) / p if not ours["unbounded"] else math.inf
    value = o / p
    return {"value": value, "low": low, "high": high, "verdict": bound_verdict(value, target, low, high)}


# ------------------------------------------------------------------------------------ parent side
def _spawn(mode: str, job: dict, args) -> subprocess.Popen:
    return spawn(__file__, mode, job, args.log, args.env)


def _job(system: str, seq_len: int, args, spec: dict | None = None, link_gbps: float | None = None) -> dict:
    activation = (
        None if system == "alst" else activation_cfg(system, args.tile_rows, args.file_dir, link_gbps)
    )
    return {
        "system": system,
        "spec": spec or args.spec,
        "seq_len": seq_len,
        "activation": activation,
        "loss_chunk_rows": args.loss_chunk_rows,
    }


def run_probe(job: dict, args) -> dict:
    t0 = time.perf_counter()
    proc = _spawn("--probe", job, args)
    try:
        r = read(proc, f"probe {job['system']} @ {job['seq_len']}", args.log)
    finally:
        proc.wait()
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


def measure_slopes(args) -> dict:
    out = {}
    for system in args.slope_systems:
        points = []
        for n in args.slope_lengths:
            r = run_probe(_job(system, n, args), args)
            growth = r["step_peak"] - r["rss_built"]
            points.append({"len": n, "growth": growth, "rss_built": r["rss_built"], "loss": r["loss"]})
            print(
                f"  {system:<12} {n:>7}: +{growth / 2**20:.0f} MiB over {gib(r['rss_built'])} GiB, "
                f"loss {r['loss']:.6f} ({r['wall_s']} s)",
                flush=True,
            )
        fit = fit_line([p["len"] for p in points], [p["growth"] for p in points])
        out[system] = {**fit, "points": points}
    return out


def search_start_for(system: str, slopes: dict, args) -> int:
    """Where a system's doubling starts: half the length at which its slope fit reaches the budget
    (rounded down to the resolution), never below ``--search-start``; the slope model is used only
    when the search model is the slopes' model. Only the number of probes depends on it: doubling
    and bisection still decide the length."""
    fit = slopes.get(system)
    if fit is None or args.spec_search != args.spec or fit["slope"] <= 0:
        return args.search_start
    built = statistics.median(p["rss_built"] for p in fit["points"])
    predicted = (args.budget - built - fit["intercept"]) / fit["slope"]
    return max(args.search_start, int(0.5 * predicted) // args.resolution * args.resolution)


def search_max_len(system: str, args, start: int | None = None) -> dict:
    tried: dict[int, dict] = {}

    def fits(seq_len: int) -> bool:
        if seq_len not in tried:
            job = {**_job(system, seq_len, args, spec=args.spec_search), "budget": args.budget}
            r = tried[seq_len] = run_probe(job, args)
            print(
                f"  {system:<12} {seq_len:>7}: {'fits' if r['fits'] else 'over'} (peak RSS {gib(r['rss'])} GiB, {r['wall_s']} s)",
                flush=True,
            )
        return tried[seq_len]["fits"]

    first = start or args.search_start
    lo, unbounded = search_lengths(fits, first, args.resolution)
    if lo == 0 and first > args.search_start:  # the slope's guess was over: search from the bottom
        lo, unbounded = search_lengths(fits, args.search_start, args.resolution)
    return {
        "max_len": lo,
        "unbounded": unbounded,
        "search_start": first,
        "tried": {str(k): v for k, v in sorted(tried.items())},
    }


def time_together(jobs: dict[str, dict], steps: int, args) -> dict:
    """Every job's worker alive at once: one warm-up step each, then ``steps`` rounds in rotating order."""
    names = list(jobs)
    procs = {s: _spawn("--worker", job, args) for s, job in jobs.items()}
    try:
        built = {s: read(p, f"{s} build", args.log) for s, p in procs.items()}
        warm = {s: ask(p, "step", f"{s} warm-up", args.log) for s, p in procs.items()}
        runs: dict[str, list[dict]] = {s: [] for s in names}
        for k in range(steps):
            for s in names[k % len(names) :] + names[: k % len(names)]:
                runs[s].append(ask(procs[s], "step", f"{s} step {k}", args.log))
            print(
                f"  step {k}: " + "  ".join(f"{s} {r[k]['step_s']:.2f}s" for s, r in runs.items()), flush=True
            )
        done = {s: ask(p, "done", f"{s} stats", args.log) for s, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return {
        s: {
            "step_s": statistics.median(r["step_s"] for r in runs[s]),
            "steps_s": [round(r["step_s"], 3) for r in runs[s]],
            "fwd_s": statistics.median(r["fwd_s"] for r in runs[s]),
            "bwd_s": statistics.median(r["bwd_s"] for r in runs[s]),
            "warmup_s": round(warm[s]["step_s"], 3),
            "loss": warm[s]["loss"],
            "rss_built": built[s]["rss_built"],
            "peak_rss": done[s]["peak_rss"],
            "activation": done[s]["activation"],
        }
        for s in names
    }


def pick_link_gbps(args) -> dict:
    if args.link_gbps != "calibrate":
        return {"link_gbps": float(args.link_gbps), "calibrated": False}
    job = _job("ours_auto", args.sweep_len, args)
    proc = _spawn("--calibrate-link", job, args)
    try:
        prof = read(proc, "link calibration", args.log)
    finally:
        proc.wait()
    t = args.sweep_len
    half = (prof["whole_bytes_per_token"] + 0.5 * prof["row_bytes_per_token"]) * t
    gbps = half / prof["layer_forward_s"] / 1e9  # the copy of alpha 0.5 takes one layer forward
    return {"link_gbps": round(gbps, 4), "calibrated": True, "profile": prof}


def sweep(args) -> dict:
    systems = [f"sweep_{a}" for a in SWEEP_ALPHAS] + ["sweep_auto"]
    jobs = {s: _job(s, args.sweep_len, args, link_gbps=args.link["link_gbps"]) for s in systems}
    t = time_together(jobs, args.sweep_steps, args)
    fixed = {s: t[s] for s in systems[:-1]}
    best = min(fixed, key=lambda s: fixed[s]["step_s"])
    auto = t["sweep_auto"]
    ends_fastest = best in (systems[0], systems[-2])
    return {
        "per_alpha": t,
        "best": best,
        "best_alpha": jobs[best]["activation"]["alpha"],
        "auto_alpha": auto["activation"].get("layer0_alpha"),
        "ends_fastest": ends_fastest,
        "auto_vs_best_of_medians": auto["step_s"] / fixed[best]["step_s"],
        "paired": paired(auto["steps_s"], fixed[best]["steps_s"], TARGETS["auto_vs_best_alpha"][1]),
    }


# ------------------------------------------------------------------------------------ report
def slope_table(slopes: dict, args) -> None:
    kib = 1024
    print(
        f"\n### Peak-RSS growth per token ({args.spec['layers']} layers, tile_rows {args.tile_rows}, "
        f"allocator {args.allocator})\n"
    )
    table_header(["system", "KiB / token", "fixed per step MiB", "R^2", "points (len: MiB above built)"])
    for s, f in slopes.items():
        pts = ", ".join(f"{p['len']}: {p['growth'] / 2**20:.0f}" for p in f["points"])
        print(f"| {s} | {f['slope'] / kib:.1f} | {f['intercept'] / 2**20:.0f} | {f['r2']:.4f} | {pts} |")


def slopes_report(slopes: dict, args) -> dict:
    """``--slopes-only``: the memory-per-token ratio alone; the other keys are null ("not run")."""
    slope_table(slopes, args)
    mem_ratio = slopes["ours_memory"]["slope"] / slopes["alst"]["slope"]
    result: dict[str, Any] = {k: None for k in TARGETS}
    result["mem_per_token_vs_alst"] = mem_ratio
    verdicts = {k: "not run" for k in TARGETS}
    verdicts["mem_per_token_vs_alst"] = bound_verdict(mem_ratio, TARGETS["mem_per_token_vs_alst"])
    detail = {
        "parts": "slopes only",
        "tile_rows": args.tile_rows,
        "allocator": args.allocator,
        "model": args.spec,
        "slope_lengths": args.slope_lengths,
        "slope_fits": slopes,
        "loadavg_start": args.loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "code": args.code_start,
    }
    return {**result, "verdicts": verdicts, "detail": detail}


def sweep_table(sweep_r: dict, args) -> None:
    print(
        f"\n### Emulated link {args.link['link_gbps']} GB/s ({'calibrated' if args.link['calibrated'] else 'given'}),"
        f" {args.sweep_len} tokens, host tier\n"
    )
    table_header(["alpha", "step s", "per step", "copy exposed s", "recomputed rows"])
    for s, r in sweep_r["per_alpha"].items():
        a = r["activation"]
        print(
            f"| {s.removeprefix('sweep_')}{' = ' + format(a.get('layer0_alpha', 0), '.3f') if s == 'sweep_auto' else ''} "
            f"| {r['step_s']:.2f} | {r['steps_s']} | {a.get('copy_exposed_s', 0):.2f} | {a.get('recomputed_rows', 0)} |"
        )
    if sweep_r["ends_fastest"]:
        print(
            f"NOTE: {sweep_r['best']} is the fastest sweep point: the link does not give an interior optimum"
        )


def sweep_report(sweep_r: dict, args) -> dict:
    """``--sweep-only``: auto_vs_best_alpha alone; the other keys are null ("not run")."""
    sweep_table(sweep_r, args)
    result: dict[str, Any] = {k: None for k in TARGETS}
    result["auto_vs_best_alpha"] = sweep_r["auto_vs_best_of_medians"]
    verdicts = {k: "not run" for k in TARGETS}
    verdicts["auto_vs_best_alpha"] = sweep_r["paired"]["verdict"]
    detail = {
        "parts": "sweep only",
        "tile_rows": args.tile_rows,
        "allocator": args.allocator,
        "model": args.spec,
        "link": args.link,
        "sweep_len": args.sweep_len,
        "sweep_steps": args.sweep_steps,
        "sweep": sweep_r,
        "loadavg_start": args.loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "code": args.code_start,
    }
    return {**result, "verdicts": verdicts, "detail": detail}


def report(slopes: dict, search: dict, timing: dict, sweep_r: dict, args) -> dict:
    slope_table(slopes, args)
    mem_ratio = slopes["ours_memory"]["slope"] / slopes["alst"]["slope"]

    print(
        f"\n### Longest sequence within {gib(args.budget)} GiB peak RSS ({args.spec_search['layers']} layers)\n"
    )
    table_header(["system", "max len", "probes (len: fits?, peak RSS GiB)"])
    for s, r in search.items():
        probes = ", ".join(f"{k}: {'y' if v['fits'] else 'n'} {gib(v['rss'])}" for k, v in r["tried"].items())
        print(f"| {s} | {r['max_len']}{' (no failing length found)' if r['unbounded'] else ''} | {probes} |")
    vs_alst = max_len_ratio(
        search["ours_memory"], search["alst"], args.resolution, TARGETS["max_len_vs_alst"]
    )
    vs_ck = max_len_ratio(
        search["ours_memory"], search["checkpoint"], args.resolution, TARGETS["max_len_vs_checkpoint"]
    )

    print(f"\n### Step time at the ALST stack's longest sequence ({args.time_len} tokens)\n")
    table_header(["system", "step s", "fwd s", "bwd s", "warm-up s", "peak RSS GiB", "loss"])
    for s, r in timing.items():
        print(
            f"| {s} | {r['step_s']:.2f} | {r['fwd_s']:.2f} | {r['bwd_s']:.2f} | {r['warmup_s']:.2f} "
            f"| {gib(r['peak_rss'])} | {r['loss']:.6f} |"
        )
    time_r = paired(timing["ours_memory"]["steps_s"], timing["alst"]["steps_s"], TARGETS["time_vs_alst"][1])

    sweep_table(sweep_r, args)

    result = {
        "max_len_vs_alst": vs_alst["value"],
        "max_len_vs_checkpoint": vs_ck["value"],
        "time_vs_alst": time_r["median"],
        "auto_vs_best_alpha": sweep_r["auto_vs_best_of_medians"],
        "mem_per_token_vs_alst": mem_ratio,
    }
    verdicts = {
        "max_len_vs_alst": vs_alst["verdict"],
        "max_len_vs_checkpoint": vs_ck["verdict"],
        "time_vs_alst": time_r["verdict"],
        "auto_vs_best_alpha": sweep_r["paired"]["verdict"],
        "mem_per_token_vs_alst": bound_verdict(mem_ratio, TARGETS["mem_per_token_vs_alst"]),
    }
    intervals = {
        "max_len_vs_alst": [vs_alst["low"], vs_alst["high"]],
        "max_len_vs_checkpoint": [vs_ck["low"], vs_ck["high"]],
        "time_vs_alst": [time_r["low"], time_r["high"]],
        "auto_vs_best_alpha": [sweep_r["paired"]["low"], sweep_r["paired"]["high"]],
    }
    print("\n### Targets\n")
    table_header(["ratio", "value", "interval", "target", "verdict"])
    for k, v in result.items():
        lo_hi = intervals.get(k)
        span = f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else "-"
        op, bound = TARGETS[k]
        print(f"| {k} | {v:.3f} | {span} | {op} {bound} | {verdicts[k]} |")
    detail = {
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "intervals": intervals,
        "tile_rows": args.tile_rows,
        "allocator": args.allocator,
        "model": args.spec,
        "model_search": args.spec_search,
        "rss_budget_bytes": args.budget,
        "resolution": args.resolution,
        "slopes_bytes_per_token": {s: f["slope"] for s, f in slopes.items()},
        "slope_fits": slopes,
        "search": search,
        "time_len": args.time_len,
        "time_steps": args.time_steps,
        "time": timing,
        "time_ratio": time_r,
        "link": args.link,
        "sweep_len": args.sweep_len,
        "sweep_steps": args.sweep_steps,
        "sweep": sweep_r,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {TORCH_THREADS}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": args.loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "code": args.code_start,
    }
    return {**result, "verdicts": verdicts, "detail": detail}


def _tile_rows(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _ints(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and budget, same keys (< 10 min)")
    parser.add_argument(
        "--tile-rows",
        type=_tile_rows,
        default="auto",
        help="ours' activation.tile_rows: rows per tile, 0 (untiled) or auto (default)",
    )
    parser.add_argument(
        "--budget-gib", type=float, default=None, help="peak-RSS budget (full 1.5, quick 0.75)"
    )
    parser.add_argument(
        "--search-layers",
        type=int,
        default=None,
        help="layers of the length-search model (default: the model's)",
    )
    parser.add_argument("--slope-lengths", type=_ints, default=None, help="comma-separated, >= 3 lengths")
    parser.add_argument(
        "--slope-systems",
        default=",".join(SLOPE_SYSTEMS),
        help="comma-separated systems of the slopes (alst and ours_memory always; e.g. leave out ours_auto, "
        "whose host tier holds every activation, at lengths where that would not fit in RAM)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="length-search resolution (default 512)")
    parser.add_argument("--search-start", type=int, default=None, help="first length of the doubling")
    parser.add_argument(
        "--time-steps", type=int, default=None, help="paired timed rounds at ALST's longest (full 5, quick 3)"
    )
    parser.add_argument(
        "--sweep-len", type=int, default=None, help="length of the alpha sweep (full 4096, quick 1024)"
    )
    parser.add_argument(
        "--sweep-steps", type=int, default=None, help="paired rounds of the sweep (full 5, quick 3)"
    )
    parser.add_argument(
        "--link-gbps",
        default="calibrate",
        help="emulated link GB/s, or 'calibrate' (alpha 0.5's copy = one layer forward)",
    )
    parser.add_argument(
        "--slopes-only",
        action="store_true",
        help="measure only the peak-RSS growth per token (load-independent; no search, timing or sweep)",
    )
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="run only the emulated-link alpha sweep (auto_vs_best_alpha)",
    )
    parser.add_argument(
        "--allocator",
        choices=("fixed", "trim"),
        default="fixed",
        help=f"fixed: every worker runs with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (default); trim: glibc's dynamic threshold",
    )
    parser.add_argument(
        "--loss-chunk-rows",
        type=int,
        default=1024,
        help="rows per loss chunk/shard of every system (the slope lengths must be >= it)",
    )
    for key in ("hidden", "intermediate", "heads", "kv_heads", "layers"):
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"model {key} override"
        )
    args = parser.parse_args(argv)
    if args.slopes_only and args.sweep_only:
        parser.error("--slopes-only and --sweep-only each run one part: pass one of them")
    q = args.quick
    args.spec = {k: getattr(args, k) or v for k, v in (QUICK_MODEL if q else FULL_MODEL).items()}
    args.spec_search = {**args.spec, "layers": args.search_layers or args.spec["layers"]}
    args.budget = int((args.budget_gib or (0.75 if q else 1.5)) * 2**30)
    args.slope_lengths = args.slope_lengths or [2048, 4096, 8192]
    if len(set(args.slope_lengths)) < 3:
        parser.error(f"--slope-lengths needs >= 3 distinct lengths, got {args.slope_lengths}")
    if args.slope_lengths[0] < args.loss_chunk_rows:  # below it the loss's chunk grows with the length
        parser.error(
            f"--slope-lengths must be >= --loss-chunk-rows ({args.loss_chunk_rows}), got {args.slope_lengths}"
        )
    args.slope_systems = [x for x in args.slope_systems.split(",") if x]
    if not {"alst", "ours_memory"} <= set(args.slope_systems) or not set(args.slope_systems) <= set(
        SLOPE_SYSTEMS
    ):
        parser.error(
            f"--slope-systems must include alst and ours_memory and name only {', '.join(SLOPE_SYSTEMS)}, "
            f"got {args.slope_systems}"
        )
    args.resolution = args.resolution or 512
    args.search_start = args.search_start or 1024
    args.time_steps = args.time_steps or (3 if q else 5)
    args.sweep_len = args.sweep_len or (1024 if q else 4096)
    args.sweep_steps = args.sweep_steps or (3 if q else 5)
    if args.link_gbps != "calibrate":
        try:
            if float(args.link_gbps) <= 0:
                raise ValueError
        except ValueError:
            parser.error(f"--link-gbps must be a positive number or 'calibrate', got {args.link_gbps!r}")
    return args


def check_configs(args) -> None:
    """Our systems' activation configs, checked before any process starts (e.g. tile_rows > 0 where
    tiled compute is not built): one line naming the key."""
    from longtrain.config_checks import ConfigError
    from longtrain.offload import ActivationConfig

    for system in ("ours_memory", "ours_auto", "sweep_auto"):
        try:
            ActivationConfig(**activation_cfg(system, args.tile_rows, "unused", link_gbps=1.0))
        except ConfigError as e:
            sys.exit(f"bench_length ({system}): {e}")


def main() -> None:
    args = parse_args()
    check_configs(args)
    args.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(TORCH_THREADS))
    args.env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.allocator == "fixed":
        args.env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    args.loadavg_start = list(os.getloadavg())
    args.code_start = code_version()
    t_start = time.time()
    args.file_dir = tempfile.mkdtemp(prefix="bench_length_", dir=os.environ.get("BENCH_FILE_DIR"))
    try:
        with tempfile.TemporaryFile("w+") as args.log:
            if args.slopes_only:
                print(f"peak-RSS growth per token at {args.slope_lengths}", flush=True)
                result = slopes_report(measure_slopes(args), args)
                print_result(result, args, t_start, "bench_length.py")
                return
            print(f"emulated link: {args.link_gbps}", flush=True)
            args.link = pick_link_gbps(args)
            print(f"  {args.link['link_gbps']} GB/s", flush=True)
            if args.sweep_only:
                print(f"alpha sweep, {args.sweep_len} tokens ({args.sweep_steps} rounds)", flush=True)
                print_result(sweep_report(sweep(args), args), args, t_start, "bench_length.py")
                return
            print(f"peak-RSS growth per token at {args.slope_lengths}", flush=True)
            slopes = measure_slopes(args)
            search: dict[str, dict] = {}
            for system in SEARCH_SYSTEMS:
                print(f"length search {system} (budget {gib(args.budget)} GiB)", flush=True)
                search[system] = search_max_len(system, args, search_start_for(system, slopes, args))
            args.time_len = max(search["alst"]["max_len"], args.search_start)
            print(f"timing at ALST's longest, {args.time_len} tokens ({args.time_steps} rounds)", flush=True)
            timing = time_together(
                {s: _job(s, args.time_len, args) for s in TIME_SYSTEMS}, args.time_steps, args
            )
            print(
                f"alpha sweep under the emulated link, {args.sweep_len} tokens ({args.sweep_steps} rounds)",
                flush=True,
            )
            sweep_r = sweep(args)
    finally:
        shutil.rmtree(args.file_dir, ignore_errors=True)
    result = report(slopes, search, timing, sweep_r, args)
    print_result(result, args, t_start, "bench_length.py")


if __name__ == "__main__":
    modes: dict[str, Any] = {"--worker": worker, "--probe": probe, "--calibrate-link": calibrate_link}
    if len(sys.argv) == 3 and sys.argv[1] in modes:
        modes[sys.argv[1]](json.loads(sys.argv[2]))
    else:
        main()

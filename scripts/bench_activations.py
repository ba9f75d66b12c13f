"""Activation-memory strategies side by side on one Llama model: step time, device bytes, peak RSS.

    python scripts/bench_activations.py --quick   # 16 layers at 4K, 5 timed steps, 16-layer length search (< 10 min)
    python scripts/bench_activations.py           # 16 layers at 4K, 8K (5 steps), 16K (10 steps); 32-layer search

Systems (same weights, same random tokens, fp32, batch 1, one document, 2 torch threads each):

    none               plain autograd                      activation.mode=none
    checkpoint         torch.utils.checkpoint per layer    mode=recompute (the executor calls the peer,
                                                           checkpoint(run_layer, use_reentrant=False))
    save_on_cpu        torch.autograd.graph.save_on_cpu    mode=offload (the executor wraps the peer)
    tokenwise          ours at its fastest: host tier, alpha auto, keep_last 2
    tokenwise_matched  ours at checkpoint's device memory: host tier, alpha and keep_last chosen so that
                       its measured device bytes fit checkpoint's (see "matched memory" below)
    tokenwise_file     ours for memory: file tier (O_DIRECT), alpha 0, keep_last 0

Fairness, the same for every system:

* Allocator policy: ``--allocator trim`` (default) trims the glibc heap at every layer boundary in
  every system (``activation.trim_heap=true``: the baselines trim where the token-wise executor
  does); ``--allocator default`` trims nowhere. Every worker gets the same environment.
* Device bytes: one counter for all (``offload.memory.DeviceBytesCounter``): on CPU, glibc's bytes in
  use sampled after every op minus the host-tier buffers the stores register; on CUDA the
  allocator's peak. It runs on one step of its own (it slows the step), never on a timed step.
  On a CPU device ``save_on_cpu`` moves nothing, so its bytes count as device bytes.
* Time: each system in its own process; the processes of one length stay alive together and step
  in turn (the starting system rotates each round), so load on this shared machine falls on all
  alike. Step counts are fixed before the run; ratios are medians of the per-round paired ratios
  with a distribution-free interval for the median (order statistics, coverage >= 90% where the
  count allows, else min..max and its coverage says so). A target is "hit" when the interval lies
  under it, "at the threshold" when the interval spans it, "miss" otherwise.
* RSS: each process's peak RSS; ``file_tier_rss_vs_none`` compares the growth above each process's
  own RSS before its first step (the fixed ~0.6 GiB of torch and the model is not the tier's).
* The file tier writes with O_DIRECT, so the bytes it frees really leave memory (no page cache).

Matched memory: before the timing, one process measures the device bytes of checkpoint and of ours
for keep_last in {0, 1, 2} x alpha in {0, 0.25, 0.5, 0.75, 1} (host tier) on one step at the
calibration length, and picks the candidate that recomputes the fewest rows, (1 - alpha) x
(layers - keep_last), among those within checkpoint's bytes. Its bytes at the timed length are
measured again and reported, within or not.

The longest-sequence search (one training step per length, each in a fresh process) doubles until
a length does not fit, with no cap, then bisects; a length fails when the process's peak RSS passes
the budget (a watchdog stops it early). The last stdout line is a JSON object (ours / peer ratios,
raw numbers under "detail").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import (
    ask,
    code_version,
    emit,
    gib,
    mib,
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
FILE_ALPHA = (
    0.0  # the file tier's memory-minimal choice: only layer input, attention output and lse go to disk
)
TIMING_SYSTEMS = ("none", "checkpoint", "save_on_cpu", "tokenwise", "tokenwise_matched", "tokenwise_file")
SEARCH_SYSTEMS = ("checkpoint", "tokenwise_file")
CANDIDATE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CANDIDATE_KEEP_LAST = (0, 1, 2)


def model_spec(num_layers: int, hidden: int = 128) -> dict:
    return {
        "hidden": hidden,
        "layers": num_layers,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 352 * hidden // 128,
    }


def activation_cfg(system: str, args, matched: dict | None = None) -> dict:
    trim = args.allocator == "trim"
    cfgs: dict[str, dict] = {
        "none": {"mode": "none"},
        "checkpoint": {"mode": "recompute"},
        "save_on_cpu": {"mode": "offload"},
        "tokenwise": {"mode": "tokenwise", "alpha": "auto", "tier": "host", "keep_last": 2},
        "tokenwise_matched": {"mode": "tokenwise", "tier": "host", **(matched or {})},
        "tokenwise_file": {
            "mode": "tokenwise",
            "alpha": FILE_ALPHA,
            "tier": "file",
            "keep_last": 0,
            "file_dir": args.file_dir,
        },
    }
    return {**cfgs[system], "trim_heap": trim}


# ------------------------------------------------------------------------------------ worker side
def _build(spec: dict, seq_len: int, activation: dict):
    import torch

    from longtrain.offload import apply_activation_memory
    from longtrain.trainer.config import ModelConfig
    from longtrain.trainer.model.adapter import adapt
    from longtrain.trainer.model.hf import build_hf_model

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)  # same weights in every worker
    sizes = ModelConfig(
        family="llama",
        hidden_size=spec["hidden"],
        num_layers=spec["layers"],
        num_heads=spec["heads"],
        num_kv_heads=spec["kv_heads"],
        intermediate_size=spec["intermediate"],
        vocab_size=VOCAB,
    )
    hf = build_hf_model(sizes, vocab_size=VOCAB, seq_len=seq_len, dtype=torch.float32)
    model = apply_activation_memory(adapt(hf, "cpu_flash"), activation)
    ids_bs = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids_bs


def _step(model, ids_bs) -> dict:
    import resource

    import torch

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = model(input_ids=ids_bs, labels=ids_bs, position_ids=torch.arange(ids_bs.shape[1])[None])
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    loss = out.loss.detach().item()
    model.zero_grad(set_to_none=True)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "fwd_s": t1 - t0,
        "bwd_s": t2 - t1,
        "step_s": t2 - t0,
        "loss": loss,
        # the process's CPU time in the step (all its threads) and its page faults: on a CPU machine
        # freshly faulted activation pages cost system time, which explains part of the step times
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
    }


def _device_bytes_step(model, ids_bs) -> int:
    """One step under the device-bytes counter (the same counter for every system)."""
    from longtrain.offload.memory import DeviceBytesCounter

    with DeviceBytesCounter(ids_bs.device) as counter:
        _step(model, ids_bs)
    return counter.peak_bytes


# what _step measures, reported as the median over the timed steps
MEDIAN_KEYS = ("step_s", "fwd_s", "bwd_s", "user_s", "sys_s", "minor_faults")


def worker(job: dict) -> None:
    """Timing worker: build, then one command per stdin line: step (timed), bytes (counted), done."""
    import psutil

    from longtrain.offload import activation_stats

    model, ids_bs = _build(job["spec"], job["seq_len"], job["activation"])
    emit({"event": "ready", "rss_built": psutil.Process().memory_info().rss})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            emit({"event": "step", **_step(model, ids_bs)})
        elif command == "bytes":
            emit({"event": "bytes", "device_bytes": _device_bytes_step(model, ids_bs)})
        else:
            break
    stats = activation_stats(model)
    model.layer_executor.close()  # the file tier deletes its file
    emit({"event": "done", "peak_rss": peak_rss(), "activation": stats})


def calibrate_worker(job: dict) -> None:
    """Device bytes of each activation config on one step (after a warm-up), in one process."""
    from longtrain.offload import apply_activation_memory

    model, ids_bs = _build(job["spec"], job["seq_len"], {"mode": "none"})
    out = []
    for cfg in job["configs"]:
        apply_activation_memory(model, cfg)
        _step(model, ids_bs)  # warm-up: alpha auto, first-touch allocations
        out.append(_device_bytes_step(model, ids_bs))
    model.layer_executor.close()
    emit({"device_bytes": out})


def probe(job: dict) -> None:
    """Length-search probe: one training step; fails when RSS passes the budget (watchdog stops early)."""
    budget = job["budget"]
    start_rss_watchdog(budget)
    model, ids_bs = _build(job["spec"], job["seq_len"], job["activation"])
    step = _step(model, ids_bs)
    peak = peak_rss()
    emit({"fits": peak <= budget, "rss": peak, **step})


# ------------------------------------------------------------------------------------ parent side
def _spawn(mode: str, job: dict, args) -> subprocess.Popen:
    return spawn(__file__, mode, job, args.log, args.env)


def _read(proc: subprocess.Popen, what: str, args) -> dict:
    return read(proc, what, args.log)


def _ask(proc: subprocess.Popen, command: str, what: str, args) -> dict:
    return ask(proc, command, what, args.log)


def calibrate_matched(args) -> dict:
    """keep_last and alpha for ours within checkpoint's device bytes (see the module docstring)."""
    candidates = [{"alpha": a, "keep_last": k} for k in CANDIDATE_KEEP_LAST for a in CANDIDATE_ALPHAS]
    configs = [activation_cfg("checkpoint", args)] + [
        activation_cfg("tokenwise_matched", args, c) for c in candidates
    ]
    t0 = time.perf_counter()
    proc = _spawn("--calibrate", {"spec": args.spec16, "seq_len": args.calib_len, "configs": configs}, args)
    try:
        measured = _read(proc, "calibration", args)["device_bytes"]
    finally:
        proc.wait()
    budget, ours = measured[0], measured[1:]
    layers = args.spec16["layers"]
    rows = [
        {
            **c,
            "device_bytes": b,
            "recomputed_layer_fraction": (1 - c["alpha"]) * (layers - c["keep_last"]) / layers,
        }
        for c, b in zip(candidates, ours, strict=True)
    ]
    within = [r for r in rows if r["device_bytes"] <= budget]
    chosen = (
        min(within, key=lambda r: (r["recomputed_layer_fraction"], -r["alpha"]))
        if within
        else min(rows, key=lambda r: r["device_bytes"])
    )
    print(
        f"  matched memory at {args.calib_len} tokens ({time.perf_counter() - t0:.0f} s): checkpoint "
        f"{mib(budget)} MiB; chosen alpha {chosen['alpha']}, keep_last {chosen['keep_last']} "
        f"({mib(chosen['device_bytes'])} MiB{'' if within else ', none fits: the smallest'})",
        flush=True,
    )
    return {
        "calib_len": args.calib_len,
        "checkpoint_bytes": budget,
        "candidates": rows,
        "chosen": {"alpha": chosen["alpha"], "keep_last": chosen["keep_last"]},
        "any_within": bool(within),
    }


def time_length(seq_len: int, steps: int, args) -> dict:
    """All systems at one length: warm-up, one device-bytes step, then ``steps`` timed rounds."""
    procs = {
        s: _spawn(
            "--worker",
            {"spec": args.spec16, "seq_len": seq_len, "activation": activation_cfg(s, args, args.matched)},
            args,
        )
        for s in TIMING_SYSTEMS
    }
    try:
        built = {s: _read(p, f"{s} @ {seq_len} build", args) for s, p in procs.items()}
        warm = {s: _ask(p, "step", f"{s} @ {seq_len} warm-up", args) for s, p in procs.items()}
        device = {
            s: _ask(p, "bytes", f"{s} @ {seq_len} bytes", args)["device_bytes"] for s, p in procs.items()
        }
        runs: dict[str, list[dict]] = {s: [] for s in TIMING_SYSTEMS}
        for k in range(steps):
            order = TIMING_SYSTEMS[k % len(TIMING_SYSTEMS) :] + TIMING_SYSTEMS[: k % len(TIMING_SYSTEMS)]
            for s in order:
                runs[s].append(_ask(procs[s], "step", f"{s} @ {seq_len} step {k}", args))
            print(
                f"  {seq_len:>6} step {k}: "
                + "  ".join(f"{s} {r[k]['step_s']:.2f}s" for s, r in runs.items()),
                flush=True,
            )
        done = {s: _ask(p, "done", f"{s} @ {seq_len} stats", args) for s, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    out = {}
    for s in TIMING_SYSTEMS:
        timed = runs[s]
        out[s] = {
            **{key: statistics.median(r[key] for r in timed) for key in MEDIAN_KEYS},
            "steps_s": [round(r["step_s"], 3) for r in timed],
            "warmup_s": round(warm[s]["step_s"], 3),
            "loss": warm[s]["loss"],
            "device_bytes": device[s],
            "rss_built": built[s]["rss_built"],
            "peak_rss": done[s]["peak_rss"],
            "activation": done[s]["activation"],
        }
    return out


def search_max_len(system: str, args) -> dict:
    """Longest length (a multiple of the resolution) whose one training step stays within the RSS budget."""
    tried: dict[int, dict] = {}

    def fits(seq_len: int) -> bool:
        t0 = time.perf_counter()
        job = {
            "spec": args.spec_search,
            "seq_len": seq_len,
            "activation": activation_cfg(system, args),
            "budget": args.budget,
        }
        proc = _spawn("--probe", job, args)
        try:
            r = tried[seq_len] = _read(proc, f"probe {system} @ {seq_len}", args)
        finally:
            proc.wait()
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"  {system:<16} {seq_len:>7}: {'fits' if r['fits'] else 'over'} (peak RSS {gib(r['rss'])} GiB, {r['wall_s']} s)",
            flush=True,
        )
        return r["fits"]

    lo, unbounded = search_lengths(fits, args.search_start, args.resolution)
    return {"max_len": lo, "unbounded": unbounded, "tried": {str(k): v for k, v in sorted(tried.items())}}


def time_ratios(t: dict, targets: dict) -> dict:
    steps = {s: t[s]["steps_s"] for s in TIMING_SYSTEMS}
    return {
        "tokenwise_time_vs_recompute": paired(
            steps["tokenwise_matched"], steps["checkpoint"], targets["tokenwise_time_vs_recompute"]
        ),
        "fastest_time_vs_none": paired(steps["tokenwise"], steps["none"], targets["fastest_time_vs_none"]),
        "tokenwise_time_vs_none": paired(
            steps["tokenwise_matched"], steps["none"], targets["tokenwise_time_vs_none"]
        ),
    }


def memory_ratios(t: dict) -> dict:
    none, tf = t["none"], t["tokenwise_file"]
    return {
        "device_act_bytes_vs_none": t["tokenwise"]["device_bytes"] / none["device_bytes"],
        "matched_bytes_vs_checkpoint": t["tokenwise_matched"]["device_bytes"]
        / t["checkpoint"]["device_bytes"],
        "file_tier_rss_vs_none": (tf["peak_rss"] - tf["rss_built"]) / (none["peak_rss"] - none["rss_built"]),
        "file_tier_total_rss_vs_none": tf["peak_rss"] / none["peak_rss"],
    }


def report(timing: dict, search: dict, args) -> dict:
    lengths = sorted(timing)
    L = lengths[-1]
    print(
        f"\n### Per length ({args.spec16['layers']} layers; timed steps: {args.steps_at}; allocator: {args.allocator})\n"
    )
    cols = [
        "len",
        "system",
        "step s",
        "fwd s",
        "bwd s",
        "user s",
        "sys s",
        "faults",
        "vs none",
        "vs checkpoint",
        "device MiB",
        "RSS before GiB",
        "peak RSS GiB",
        "loss",
    ]
    table_header(cols)
    for n in lengths:
        t = timing[n]
        for s in TIMING_SYSTEMS:
            r = t[s]
            print(
                f"| {n} | {s} | {r['step_s']:.2f} | {r['fwd_s']:.2f} | {r['bwd_s']:.2f} | {r['user_s']:.1f} | {r['sys_s']:.1f} "
                f"| {r['minor_faults'] / 1e3:.0f}k | {r['step_s'] / t['none']['step_s']:.2f} "
                f"| {r['step_s'] / t['checkpoint']['step_s']:.2f} | {mib(r['device_bytes'])} | {gib(r['rss_built'])} "
                f"| {gib(r['peak_rss'])} | {r['loss']:.6f} |"
            )
    print("\n### Ours: executor statistics of the last step\n")
    table_header(
        [
            "len",
            "system",
            "alpha",
            "keep_last",
            "offloaded layers",
            "recomputed rows",
            "host/file MiB",
            "copy s",
            "copy exposed s",
            "heap trims",
            "trim s",
        ]
    )
    for n in lengths:
        for s in ("tokenwise", "tokenwise_matched", "tokenwise_file"):
            a = timing[n][s]["activation"]
            print(
                f"| {n} | {s} | {a.get('alpha', 0):.3f} | {activation_cfg(s, args, args.matched).get('keep_last')} "
                f"| {a.get('offloaded_layers', 0)} | {a['recomputed_rows']} | {mib(a['host_bytes'] + a['file_bytes'])} "
                f"| {a.get('copy_s', 0):.3f} | {a.get('copy_exposed_s', 0):.3f} | {a.get('heap_trims', 0)} | {a.get('heap_trim_s', 0):.3f} |"
            )
    targets = {**TARGETS, "device_act_bytes_vs_none": (2 + 2) / args.spec16["layers"]}
    times = time_ratios(timing[L], targets)
    mems = memory_ratios(timing[L])
    print(
        f"\n### Time ratios at {L} tokens: medians of {args.steps_at[L]} paired steps, interval for the median\n"
    )
    table_header(["ratio", "median", "interval", "coverage", "target", "verdict", "per step"])
    for k, v in times.items():
        print(
            f"| {k} | {v['median']:.3f} | {v['low']:.3f}-{v['high']:.3f} | {v['coverage']:.0%} | <= {v['target']} | {v['verdict']} | {v['per_step']} |"
        )
    max_len = {s: r["max_len"] for s, r in search.items()}
    ck = max(1, max_len.get("checkpoint", 0))
    result = {
        "tokenwise_time_vs_recompute": times["tokenwise_time_vs_recompute"]["median"],
        "fastest_time_vs_none": times["fastest_time_vs_none"]["median"],
        "tokenwise_time_vs_none": times["tokenwise_time_vs_none"]["median"],
        "device_act_bytes_vs_none": mems["device_act_bytes_vs_none"],
        "file_tier_rss_vs_none": mems["file_tier_rss_vs_none"],
        "max_len_vs_checkpoint": max_len["tokenwise_file"] / ck if search else float("nan"),
    }
    print(f"\n### Memory ratios at {L} tokens\n")
    table_header(["ratio", "value", "target", "verdict"])
    # (ratio, value, ">=" / "<=" and its bound, or None for a figure given beside the others)
    mem_rows: list[tuple[str, float, tuple[str, float] | None]] = [
        (
            "device_act_bytes_vs_none",
            mems["device_act_bytes_vs_none"],
            ("<=", targets["device_act_bytes_vs_none"]),
        ),
        ("matched_bytes_vs_checkpoint", mems["matched_bytes_vs_checkpoint"], ("<=", 1.0)),
        (
            "file_tier_rss_vs_none (growth above the process's RSS before its first step)",
            mems["file_tier_rss_vs_none"],
            ("<=", 0.5),
        ),
        ("file_tier_total_rss_vs_none (whole peak RSS)", mems["file_tier_total_rss_vs_none"], None),
    ]
    if search:
        mem_rows.append(("max_len_vs_checkpoint", result["max_len_vs_checkpoint"], (">=", 1.5)))
    for name, v, target in mem_rows:
        if target is None:
            print(f"| {name} | {v:.3f} | - | - |")
            continue
        op, bound = target
        hit = v >= bound if op == ">=" else v <= bound
        print(f"| {name} | {v:.3f} | {op} {bound:.3f} | {'hit' if hit else 'miss'} |")
    if search:
        print(
            f"\n### Longest sequence within {gib(args.budget)} GiB peak RSS ({args.spec_search['layers']} layers, one step per length in a fresh process; allocator: {args.allocator})\n"
        )
        table_header(["system", "max len", "vs checkpoint", "probes (len: fits?, peak RSS GiB)"])
        for s, r in search.items():
            probes = ", ".join(
                f"{k}: {'y' if v['fits'] else 'n'} {gib(v['rss'])}" for k, v in r["tried"].items()
            )
            print(
                f"| {s} | {r['max_len']}{' (no failing length found)' if r['unbounded'] else ''} | {r['max_len'] / ck:.2f} | {probes} |"
            )
    detail = {
        "targets": targets,
        "time_ratios": times,
        "memory_ratios": mems,
        "matched": args.matched_detail,
        "lengths": lengths,
        "steps": {str(k): v for k, v in args.steps_at.items()},
        "allocator": args.allocator,
        "model_timing": args.spec16,
        "model_search": args.spec_search,
        "file_alpha": FILE_ALPHA,
        "rss_budget_bytes": args.budget,
        "max_len": max_len,
        "per_length": {str(n): timing[n] for n in lengths},
        "search": search,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {TORCH_THREADS}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": args.loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "code": args.code_start,
    }
    return {**result, "detail": detail}


TARGETS = {  # ours / peer; the time ratios are judged on their interval (see paired)
    "tokenwise_time_vs_recompute": 0.85,  # at checkpoint's device memory
    "fastest_time_vs_none": 1.0,
    "tokenwise_time_vs_none": 1.15,
    "device_act_bytes_vs_none": None,  # (keep_last + 2) / num_layers, filled in by report()
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4K, 5 timed steps, 16-layer length search (< 10 min)"
    )
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated lengths of the timing")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps at the largest length (default 10; quick 5)"
    )
    parser.add_argument(
        "--allocator", choices=("trim", "default"), default="trim", help="the heap policy of every system"
    )
    parser.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="peak-RSS budget of the length search (quick 0.9, full 1.5)",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the longest-sequence search")
    args = parser.parse_args()
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else ([4096] if args.quick else [4096, 8192, 16384])
    )
    lengths.sort()
    headline_steps = args.steps or (5 if args.quick else 10)
    args.steps_at = {n: headline_steps if n == lengths[-1] else min(5, headline_steps) for n in lengths}
    args.spec16 = model_spec(16)
    args.spec_search = model_spec(16 if args.quick else 32)
    args.budget = int((args.budget_gib or (0.9 if args.quick else 1.5)) * 2**30)
    args.search_start, args.resolution = 1024, (1024 if args.quick else 512)
    args.calib_len = min(1024 if args.quick else 2048, lengths[0])
    args.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(TORCH_THREADS))
    args.loadavg_start = list(os.getloadavg())
    args.code_start = code_version()
    t_start = time.time()
    args.file_dir = tempfile.mkdtemp(prefix="bench_activations_", dir=os.environ.get("BENCH_FILE_DIR"))
    try:
        with tempfile.TemporaryFile("w+") as args.log:
            print(
                f"calibrating matched memory ({len(CANDIDATE_ALPHAS) * len(CANDIDATE_KEEP_LAST)} candidates)",
                flush=True,
            )
            args.matched_detail = calibrate_matched(args)
            args.matched = args.matched_detail["chosen"]
            timing: dict[int, dict] = {}
            for n in lengths:
                print(
                    f"timing {n} tokens ({', '.join(TIMING_SYSTEMS)}), {args.steps_at[n]} timed steps",
                    flush=True,
                )
                timing[n] = time_length(n, args.steps_at[n], args)
            search: dict[str, dict] = {}
            for system in () if args.no_search else SEARCH_SYSTEMS:
                print(f"length search {system} (budget {gib(args.budget)} GiB)", flush=True)
                search[system] = search_max_len(system, args)
    finally:
        shutil.rmtree(args.file_dir, ignore_errors=True)
    result = report(timing, search, args)
    print_result(result, args, t_start, "bench_activations.py")


if __name__ == "__main__":
    modes = {"--worker": worker, "--probe": probe, "--calibrate": calibrate_worker}
    if len(sys.argv) == 3 and sys.argv[1] in modes:
        modes[sys.argv[1]](json.loads(sys.argv[2]))
    else:
        main()

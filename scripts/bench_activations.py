"""Activation-memory strategies side by side on one Llama model: time, accounted bytes, peak RSS.

    python scripts/bench_activations.py --quick   # 16 layers at 2K, 4K; length search capped at 8K (< 10 min)
    python scripts/bench_activations.py           # 16 layers at 4K, 8K, 16K; 32-layer length search

Systems (same weights, same random tokens, fp32, batch 1, one document):

    none            plain autograd                    apply_activation_memory(mode=none)
    checkpoint      torch.utils.checkpoint per layer  mode=recompute: the executor IS the peer,
                                                      checkpoint(run_layer, use_reentrant=False)
    save_on_cpu     torch.autograd.graph.save_on_cpu  mode=offload: the executor wraps exactly that peer
    tokenwise       ours: alpha auto, host tier, keep_last 2
    tokenwise_file  ours: file tier under a temp dir, alpha 0, keep_last 2 (see FILE_ALPHA); the file
                    tier trims the heap at layer boundaries by default (activation.trim_heap=auto)

Every system runs in its own worker process (so ``ru_maxrss`` is that system's own peak). The
workers of one length stay alive together and step in turn, round-robin, so load from other
processes on this shared 2-core machine falls on all systems alike; each reports the median of
its timed steps after one warm-up step. Device-resident activation bytes are *accounted*:

    none          bytes autograd saves in the decoder layers (saved_tensors_hooks counter over the
                  warm-up forward; unique storages, parameters and RoPE tables excluded)
    checkpoint    the layer inputs it keeps + one layer's saved bytes (rebuilt in its backward)
    save_on_cpu   0 on the device; everything on the host (on a CPU machine ``.cpu()`` is a no-op,
                  so the "host" copy is the original and RSS matches none)
    tokenwise*    activation_stats(model)["device_peak_bytes"] (the executor's own accounting)

The longest-sequence search (32 layers) runs one step per length in a fresh process, doubling
then bisecting; a length fails when the process's RSS exceeds the budget (a watchdog thread stops
it early). The last stdout line is a JSON object (ours / peer ratios, raw numbers under "detail").
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

VOCAB = 4096
# alpha of the file tier: 0 is the memory-minimal choice. Offloaded rows are staged (the original kept)
# until their copy completes; at 0 only the layer input, attention output and lse go to the file.
FILE_ALPHA = 0.0
SYSTEMS = ("none", "checkpoint", "save_on_cpu", "tokenwise", "tokenwise_file")
# length search: the peer, ours as configured above, and ours with keep_last 0 (extra: what keep_last costs)
SEARCH_SYSTEMS = ("checkpoint", "tokenwise_file", "tokenwise_file_keep0")


def model_spec(num_layers: int, hidden: int = 128) -> dict:
    return {
        "hidden": hidden,
        "layers": num_layers,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 352 * hidden // 128,
    }


def activation_cfg(system: str, file_dir: str) -> dict:
    cfgs: dict[str, dict] = {
        "none": {"mode": "none"},
        "checkpoint": {"mode": "recompute"},
        "save_on_cpu": {"mode": "offload"},
        "tokenwise": {"mode": "tokenwise", "alpha": "auto", "tier": "host", "keep_last": 2},
        "tokenwise_file": {
            "mode": "tokenwise",
            "alpha": FILE_ALPHA,
            "tier": "file",
            "keep_last": 2,
            "file_dir": file_dir,
        },
        "tokenwise_file_keep0": {
            "mode": "tokenwise",
            "alpha": FILE_ALPHA,
            "tier": "file",
            "keep_last": 0,
            "file_dir": file_dir,
        },
    }
    return cfgs[system]


# ------------------------------------------------------------------------------------ worker side
def _build(spec: dict, seq_len: int, system: str, file_dir: str):
    import torch

    from longtrain.offload import apply_activation_memory
    from longtrain.trainer.config import ModelConfig
    from longtrain.trainer.model.adapter import adapt
    from longtrain.trainer.model.hf import build_hf_model

    torch.set_num_threads(2)
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
    model = apply_activation_memory(adapt(hf, "cpu_flash"), activation_cfg(system, file_dir))
    ids_bs = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids_bs


class SavedBytesCounter:
    """The plain executor (run_layer per layer) with a saved_tensors_hooks counter around each layer."""

    def __init__(self, params: set[int]):
        self.params = params
        self.layer_bytes: list[int] = []  # bytes autograd saves in each layer (unique storages)
        self.input_bytes: list[int] = []  # each layer's input x_th (what checkpoint keeps)

    def __call__(self, layers, x_th, ctx):
        import torch

        from longtrain.trainer.model.adapter import run_layer

        seen = set(self.params) | {
            ctx.cos_td.untyped_storage().data_ptr(),
            ctx.sin_td.untyped_storage().data_ptr(),
        }
        for parts in layers:
            self.input_bytes.append(x_th.numel() * x_th.element_size())
            self.layer_bytes.append(0)

            def pack(t):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    self.layer_bytes[-1] += t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x_th = run_layer(parts, x_th, ctx)
        return x_th


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


# what _step measures, reported as the median over the timed steps
MEDIAN_KEYS = ("step_s", "fwd_s", "bwd_s", "user_s", "sys_s", "minor_faults")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _emit(obj: dict) -> None:
    print("@@" + json.dumps(obj), flush=True)


def worker(job: dict) -> None:
    """Timing worker: build, then one step per 'go' line on stdin; final stats after the last."""
    import psutil

    from longtrain.offload import activation_stats

    model, ids_bs = _build(job["spec"], job["seq_len"], job["system"], job["file_dir"])
    _emit({"event": "ready", "rss_built": psutil.Process().memory_info().rss})
    plain = model.layer_executor
    counter = None
    for i in range(job["steps"]):
        if sys.stdin.readline().strip() != "go":
            return
        if i == 0 and job["system"] == "none":  # count saved bytes on the warm-up forward only
            counter = SavedBytesCounter({p.untyped_storage().data_ptr() for p in model.parameters()})
            model.layer_executor = counter
        _emit({"event": "step", **_step(model, ids_bs)})
        model.layer_executor = plain
    result = {"event": "done", "peak_rss": _peak_rss(), "activation": activation_stats(model)}
    if counter is not None:
        result.update(layer_bytes=counter.layer_bytes, input_bytes=counter.input_bytes)
    if hasattr(plain, "close"):
        plain.close()  # the file tier deletes its file
    _emit(result)


def probe(job: dict) -> None:
    """Length-search probe: one training step; fails when RSS passes the budget (watchdog stops early)."""
    import psutil

    budget, proc = job["budget"], psutil.Process()

    def watchdog() -> None:
        while True:
            rss = proc.memory_info().rss
            if rss > budget:
                _emit({"fits": False, "rss": rss, "stopped_early": True})
                os._exit(0)
            time.sleep(0.01)

    threading.Thread(target=watchdog, daemon=True).start()
    model, ids_bs = _build(job["spec"], job["seq_len"], job["system"], job["file_dir"])
    step = _step(model, ids_bs)
    peak = _peak_rss()
    _emit({"fits": peak <= budget, "rss": peak, **step})


# ------------------------------------------------------------------------------------ parent side
def _spawn(mode: str, job: dict, args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode, json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=args.log,
        text=True,
        bufsize=1,
        env=args.env,
    )


def _read(proc: subprocess.Popen, what: str, args) -> dict:
    assert proc.stdout is not None  # _spawn pipes it
    for line in proc.stdout:
        if line.startswith("@@"):
            return json.loads(line[2:])
    rc = proc.wait()
    args.log.flush()
    args.log.seek(0)
    raise RuntimeError(
        f"{what}: worker exited (rc={rc}) without a result; stderr ends with:\n{args.log.read()[-4000:]}"
    )


def time_length(seq_len: int, args) -> dict:
    """All systems at one length, round-robin: step k of every system, then step k+1 (step 0 = warm-up)."""
    procs = {
        s: _spawn(
            "--worker",
            {
                "spec": args.spec16,
                "seq_len": seq_len,
                "system": s,
                "steps": args.steps + 1,
                "file_dir": args.file_dir,
            },
            args,
        )
        for s in SYSTEMS
    }
    try:
        built = {s: _read(p, f"{s} @ {seq_len} build", args) for s, p in procs.items()}
        runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for k in range(args.steps + 1):
            for system, proc in procs.items():
                assert proc.stdin is not None  # _spawn pipes it
                proc.stdin.write("go\n")
                proc.stdin.flush()
                runs[system].append(_read(proc, f"{system} @ {seq_len} step {k}", args))
            print(
                f"  {seq_len:>6} step {k}: "
                + "  ".join(f"{s} {r[k]['step_s']:.2f}s" for s, r in runs.items()),
                flush=True,
            )
        done = {s: _read(p, f"{s} @ {seq_len} stats", args) for s, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    out = {}
    for system in SYSTEMS:
        timed = runs[system][1:]
        out[system] = {
            **{key: statistics.median(r[key] for r in timed) for key in MEDIAN_KEYS},
            "min_step_s": min(r["step_s"] for r in timed),
            "steps_s": [round(r["step_s"], 3) for r in runs[system]],  # [warm-up, timed...]
            "loss": runs[system][0]["loss"],
            "rss_built": built[system]["rss_built"],
            "peak_rss": done[system]["peak_rss"],
            "activation": done[system]["activation"],
        }
    layer_bytes, input_bytes = done["none"]["layer_bytes"], done["none"]["input_bytes"]
    out["none"]["device_act_bytes"] = sum(layer_bytes)
    out["checkpoint"]["device_act_bytes"] = sum(input_bytes) + max(layer_bytes)
    out["save_on_cpu"].update(device_act_bytes=0, host_act_bytes=sum(layer_bytes))
    for system in ("tokenwise", "tokenwise_file"):
        act = out[system]["activation"]
        out[system].update(
            device_act_bytes=act["device_peak_bytes"], host_act_bytes=act["host_bytes"] + act["file_bytes"]
        )
    return out


def search_max_len(system: str, args) -> dict:
    """Longest length (multiple of the resolution) whose one training step stays within the RSS budget."""
    tried: dict[int, dict] = {}

    def fits(seq_len: int) -> bool:
        t0 = time.perf_counter()
        proc = _spawn(
            "--probe",
            {
                "spec": args.spec32,
                "seq_len": seq_len,
                "system": system,
                "budget": args.budget,
                "file_dir": args.file_dir,
            },
            args,
        )
        try:
            r = tried[seq_len] = _read(proc, f"probe {system} @ {seq_len}", args)
        finally:
            proc.wait()
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"  {system:<21} {seq_len:>6}: {'fits' if r['fits'] else 'over'} (peak RSS {_gib(r['rss'])} GiB, "
            f"{r['wall_s']} s)",
            flush=True,
        )
        return r["fits"]

    lo, hi, s = 0, None, args.search_start
    while s <= args.search_cap:  # doubling
        if not fits(s):
            hi = s
            break
        lo, s = s, 2 * s
    while hi is not None and hi - lo > args.resolution:  # bisection on multiples of the resolution
        mid = (lo + hi) // 2 // args.resolution * args.resolution
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_len": lo, "capped": hi is None, "tried": {str(k): v for k, v in sorted(tried.items())}}


def _code_version() -> str:
    """git HEAD plus a hash of the measured packages' sources (others may commit while this runs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    digest = hashlib.sha1()
    for sub in ("offload", os.path.join("trainer", "model")):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            if name.endswith(".py"):
                with open(os.path.join(root, sub, name), "rb") as f:
                    digest.update(f.read())
    return f"{head.stdout.strip() or 'unknown'}+src:{digest.hexdigest()[:10]}"


def _table_header(cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


TARGETS = {  # ours / peer; max_len is ">=", the rest "<="
    "tokenwise_time_vs_recompute": 0.8,
    "tokenwise_time_vs_none": 1.15,
    "device_act_bytes_vs_none": None,  # (keep_last + 2) / num_layers, filled in below
    "file_tier_rss_vs_none": 0.5,
    "max_len_vs_checkpoint": 1.5,
}


def ratios_at(t: dict) -> dict:
    tw, tf, none = t["tokenwise"], t["tokenwise_file"], t["none"]
    return {
        "tokenwise_time_vs_recompute": tw["step_s"] / t["checkpoint"]["step_s"],
        "tokenwise_time_vs_none": tw["step_s"] / none["step_s"],
        "device_act_bytes_vs_none": tw["device_act_bytes"] / none["device_act_bytes"],
        "file_tier_rss_vs_none": tf["peak_rss"] / none["peak_rss"],
    }


def report(timing: dict, search: dict, args) -> dict:
    lengths = sorted(timing)
    print(
        f"\n### Per length (16 layers; median of {args.steps} timed steps after 1 warm-up, "
        "each system in its own process)\n"
    )
    cols = [
        "len",
        "system",
        "step s",
        "min s",
        "fwd s",
        "bwd s",
        "user s",
        "sys s",
        "faults",
        "vs none",
        "vs checkpoint",
        "device act GiB",
        "host/file act GiB",
        "peak RSS GiB",
        "loss",
    ]
    _table_header(cols)
    for L in lengths:
        t = timing[L]
        for s in SYSTEMS:
            r = t[s]
            print(
                f"| {L} | {s} | {r['step_s']:.2f} | {r['min_step_s']:.2f} | {r['fwd_s']:.2f} | {r['bwd_s']:.2f} "
                f"| {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['minor_faults'] / 1e3:.0f}k "
                f"| {r['step_s'] / t['none']['step_s']:.2f} | {r['step_s'] / t['checkpoint']['step_s']:.2f} "
                f"| {_gib(r['device_act_bytes'])} | {_gib(r.get('host_act_bytes', 0))} | {_gib(r['peak_rss'])} "
                f"| {r['loss']:.6f} |"
            )
    print("\n### Ours: executor statistics of the last step\n")
    cols = [
        "len",
        "system",
        "alpha",
        "offloaded layers",
        "recomputed rows",
        "copy s",
        "copy exposed s",
        "heap trims",
        "trim s",
    ]
    _table_header(cols)
    for L in lengths:
        for s in ("tokenwise", "tokenwise_file"):
            a = timing[L][s]["activation"]
            print(
                f"| {L} | {s} | {a.get('alpha', 0):.3f} | {a.get('offloaded_layers', 0)} | {a['recomputed_rows']} "
                f"| {a.get('copy_s', 0):.3f} | {a.get('copy_exposed_s', 0):.3f} "
                f"| {a.get('heap_trims', 0)} | {a.get('heap_trim_s', 0):.3f} |"
            )
    targets = {**TARGETS, "device_act_bytes_vs_none": (2 + 2) / args.spec16["layers"]}
    ratios = ratios_at(timing[lengths[-1]])
    ck = max(1, search["checkpoint"]["max_len"]) if search else 0
    ratios["max_len_vs_checkpoint"] = search["tokenwise_file"]["max_len"] / ck if search else float("nan")
    hits = {
        k: (v >= targets[k] if k == "max_len_vs_checkpoint" else v <= targets[k]) for k, v in ratios.items()
    }
    print(f"\n### Ratios (ours / peer) at the largest length, {lengths[-1]} tokens\n")
    print("| ratio | value | target | hit |\n|---|---|---|---|")
    for k, v in ratios.items():
        op = ">=" if k == "max_len_vs_checkpoint" else "<="
        print(f"| {k} | {v:.3f} | {op} {targets[k]:.3f} | {'yes' if hits[k] else 'NO'} |")
    if search:
        print(
            f"\n### Longest sequence within {_gib(args.budget)} GiB peak RSS ({args.spec32['layers']} layers, "
            "one training step per length in a fresh process)\n"
        )
        print("| system | max len | vs checkpoint | probes (len: fits?, peak RSS GiB) |\n|---|---|---|---|")
        for s, r in search.items():
            probes = ", ".join(
                f"{k}: {'y' if v['fits'] else 'n'} {_gib(v['rss'])}" for k, v in r["tried"].items()
            )
            capped = f" (cap {args.search_cap})" if r["capped"] else ""
            print(f"| {s} | {r['max_len']}{capped} | {r['max_len'] / ck:.2f} | {probes} |")
    detail = {
        "targets": targets,
        "hits": hits,
        "largest_len": lengths[-1],
        "lengths": lengths,
        "steps": args.steps,
        "ratios_per_length": {str(L): ratios_at(timing[L]) for L in lengths},
        "model_16": args.spec16,
        "model_32": args.spec32,
        "file_alpha": FILE_ALPHA,
        "rss_budget_bytes": args.budget,
        "malloc_mmap_threshold": args.mmap_threshold,
        "max_len": {s: r["max_len"] for s, r in search.items()},
        "max_len_vs_checkpoint_keep0": search["tokenwise_file_keep0"]["max_len"] / ck if search else None,
        "per_length": {str(L): timing[L] for L in lengths},
        "search": search,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 2, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": args.loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "code": args.code_start,
    }
    return {**ratios, "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2K and 4K, bounded length search (< 10 min)")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated lengths (16-layer timing)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after 1 warm-up)")
    parser.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="peak-RSS budget of the length search (1.0 quick, 1.5 full)",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the longest-sequence search")
    parser.add_argument(
        "--search-first",
        action="store_true",
        help="run the length search before the timed steps (its probes are judged by peak RSS alone, "
        "so it can run while the machine is still busy; the timing then gets the quiet machine)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="set MALLOC_MMAP_THRESHOLD_ in every worker (glibc; default: glibc's own dynamic one)",
    )
    args = parser.parse_args()
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else ([2048, 4096] if args.quick else [4096, 8192, 16384])
    )
    args.spec16, args.spec32 = model_spec(16), model_spec(32)
    args.budget = int((args.budget_gib or (1.0 if args.quick else 1.5)) * 2**30)
    args.search_start, args.search_cap = 1024, (8192 if args.quick else 32768)
    args.resolution = 1024 if args.quick else 512
    args.env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.mmap_threshold is not None:
        args.env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    args.loadavg_start = list(os.getloadavg())
    args.code_start = _code_version()
    t_start = time.time()
    args.file_dir = tempfile.mkdtemp(prefix="bench_activations_")
    try:
        with tempfile.TemporaryFile("w+") as args.log:
            timing: dict[int, dict] = {}
            search: dict[str, dict] = {}

            def run_timing() -> None:
                for L in lengths:
                    print(f"timing {L} tokens ({', '.join(SYSTEMS)})", flush=True)
                    timing[L] = time_length(L, args)

            def run_search() -> None:
                for system in () if args.no_search else SEARCH_SYSTEMS:
                    print(f"length search {system} (budget {_gib(args.budget)} GiB)", flush=True)
                    search[system] = search_max_len(system, args)

            for phase in (run_search, run_timing) if args.search_first else (run_timing, run_search):
                phase()
    finally:
        shutil.rmtree(args.file_dir, ignore_errors=True)
    result = report(timing, search, args)
    if _code_version() != args.code_start:
        print(
            f"WARNING: offload/ or trainer/model/ changed during the run ({args.code_start} -> {_code_version()})"
        )
        result["detail"]["code_end"] = _code_version()
    result["detail"]["wall_s"] = round(time.time() - t_start, 1)
    result["detail"]["command"] = " ".join(["python", "scripts/bench_activations.py", *sys.argv[1:]])
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--probe"):
        (worker if sys.argv[1] == "--worker" else probe)(json.loads(sys.argv[2]))
    else:
        main()

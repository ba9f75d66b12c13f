"""Optimizer-state offload against its floors and peers (issue 11's benchmark, parts 1 and 2).

    python scripts/bench_optim_offload.py --quick   # 48 Mi parameters, 7 rounds; 4 x 80 MB NVMe, 5 rounds
    python scripts/bench_optim_offload.py           # 96 Mi parameters, 15 rounds; 8 x 80 MB NVMe, 9 rounds

1. CPU update speed. Parameters/s of our CPU update (``OptimizerContainer.step()`` with
   ``optim.offload=dram``, no clipping: the per-tensor gradient norms it always computes, then
   torch's fused AdamW per sub-group on the DRAM tier) against the memory-bandwidth floor: 28 bytes
   per float32 parameter (p, g, m, v read; p, m, v written) at the stream bandwidth measured in the
   same round (``optim.bandwidth.stream_samples``: in-place ``a += s * b`` over 256 MiB buffers,
   AdamW's in-place access pattern; median of 3 passes). Peers on the same parameters: torch AdamW
   fused and foreach, DeepSpeedCPUAdam (its op is JIT-built once here if it is not built; a build
   failure is reported, not hidden). ``cpu_adam_vs_floor`` = floor time / our step time.
2. NVMe tier. GB/s of ``optim.tiers.NvmeTier`` store/load (the tier's code: O_DIRECT, 4 KiB-padded
   regions, one call per sub-group) against raw O_DIRECT ``os.pwrite`` / ``os.preadv`` of the same
   sizes at the same offsets from the same aligned buffer, in another file of the same directory.
   Neither goes through the page cache; neither fsyncs. One warm-up round (block allocation).
3. End to end against DeepSpeed ZeRO-3 and FSDP's state bytes: not built yet (needs
   ``parallel.shard=fsdp``); its keys are null with a note. ``nvme_rss_vs_dram`` /
   ``nvme_time_vs_dram`` are null too (see "detail").

Fairness: 2 torch threads for everything; one timer (``time.perf_counter`` around one call) for all
systems; round and warm-up counts fixed before the run; in each round every system runs once, the
starting system rotating, so load on this shared machine falls on all alike. A ratio is the median
of its per-round values with a distribution-free interval for the median (order statistics,
coverage >= 90% where the count allows, else min..max with its coverage). Verdict against a
"higher is better" target: "hit" when the interval lies at or above it, "miss" when it lies below,
"at the threshold" when it spans it. One run, reported as it came out. The last stdout line is a
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

THREADS = 2
BYTES_PER_PARAM = 28  # float32 AdamW: p, g, m, v read (16) + p, m, v written (12)
TENSOR_SHAPE = (4096, 1024)  # parameters as 4 Mi-element matrices (reference/offload.md section 4)
STREAM_BYTES = 256 * 2**20
SUBGROUP_STATE = 80_000_000  # m and v of 1e7 float32 parameters: the default sub-group
NOT_BUILT = "not built yet: needs parallel.shard=fsdp"
TARGETS = {"cpu_adam_vs_floor": 0.9, "nvme_read_vs_raw": 0.8, "nvme_write_vs_raw": 0.8}


# ---------------------------------------------------------------------------- pure pieces (tested)
def median_interval(values: list[float], coverage: float = 0.90) -> tuple[float, float, float]:
    """(low, high, achieved coverage): the narrowest symmetric order-statistic interval for the median
    whose binomial coverage is >= ``coverage``; min..max (with its smaller coverage) if none is."""
    xs, n = sorted(values), len(values)

    def cov(j: int) -> float:  # P(x_(j) <= median <= x_(n+1-j)), 1-based j
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2**n

    best = 1
    for j in range(1, n // 2 + 1):
        if cov(j) >= coverage:
            best = j
    return xs[best - 1], xs[n - best], cov(best)


def summary(values: list[float], target: float | None = None) -> dict:
    """Median, interval and (with a higher-is-better ``target``) the verdict of per-round values."""
    lo, hi, cov = median_interval(values)
    out: dict[str, float | str] = {
        "median": statistics.median(values),
        "low": lo,
        "high": hi,
        "coverage": round(cov, 3),
    }
    out["n"] = len(values)
    if target is not None:
        out["target"] = target
        out["verdict"] = "hit" if lo >= target else ("miss" if hi < target else "at the threshold")
    return out


def floor_ratios(step_s: list[float], stream_gbps: list[float], params: int) -> list[float]:
    """Per round: the floor's time (28 bytes per parameter at that round's stream bandwidth) over the
    measured step time (1.0: on the floor)."""
    return [BYTES_PER_PARAM * params / (bw * 1e9) / s for s, bw in zip(step_s, stream_gbps, strict=True)]


def rotated(names: list[str], round_index: int) -> list[str]:
    k = round_index % len(names)
    return names[k:] + names[:k]


def final_line(detail: dict) -> dict:
    """The JSON line: the headline medians (null where not measured) and everything under detail."""
    cpu, nvme = detail.get("cpu_update", {}), detail.get("nvme", {})

    def med(d: dict, key: str) -> float | None:
        return round(d[key]["median"], 4) if key in d else None

    return {
        "cpu_adam_vs_floor": med(cpu.get("vs_floor", {}), "ours"),
        "nvme_read_vs_raw": med(nvme, "read_vs_raw"),
        "nvme_write_vs_raw": med(nvme, "write_vs_raw"),
        "step_time_vs_deepspeed": None,
        "rss_vs_deepspeed": None,
        "nvme_rss_vs_dram": None,
        "nvme_time_vs_dram": None,
        "fsdp_state_bytes_vs_replicated": None,
        "detail": detail,
    }


# ---------------------------------------------------------------------------- 1. CPU update
def _params(n_params: int, seed: int):
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    count = n_params // math.prod(TENSOR_SHAPE)  # matrices: weight decay applies to all, as in peers
    params = [nn.Parameter(torch.randn(TENSOR_SHAPE, generator=gen) * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _cpu_systems(n_params: int, deepspeed_note: dict) -> dict[str, Callable[[], object]]:
    """name -> one optimizer step, each over its own parameters and gradients (same values)."""
    import torch
    from torch import nn

    from longtrain.optim import OptimConfig, build_optimizer

    hyper: dict = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    systems: dict[str, Callable[[], object]] = {}
    model = nn.ParameterList(_params(n_params, 0))
    cfg = OptimConfig(offload="dram", grad_clip=0.0, cpu_impl="torch", weight_decay=0.1, lr=1e-4)
    ours = build_optimizer(model, cfg, overlap_backward=False)
    systems["ours"] = ours.step
    systems["torch_fused"] = torch.optim.AdamW(_params(n_params, 0), fused=True, **hyper).step
    systems["torch_foreach"] = torch.optim.AdamW(_params(n_params, 0), foreach=True, **hyper).step
    start = time.perf_counter()
    try:
        from longtrain.optim.cpu_adam import load_deepspeed_cpu_adam

        cls = load_deepspeed_cpu_adam()  # builds the op on first use
        deepspeed_note["build_or_load_s"] = round(time.perf_counter() - start, 1)
        systems["deepspeed_cpu_adam"] = cls(_params(n_params, 0), adamw_mode=True, **hyper).step
    except Exception as e:  # ConfigError naming the reason
        deepspeed_note["error"] = str(e)
    return systems


def bench_cpu_update(n_params: int, rounds: int, warmup: int) -> dict:
    from longtrain.optim.bandwidth import stream_samples

    note: dict = {}
    systems = _cpu_systems(n_params, note)
    names = list(systems)
    for _ in range(warmup):
        for name in names:
            systems[name]()
    steps: dict[str, list[float]] = {n: [] for n in names}
    stream: list[float] = []
    for r in range(rounds):
        stream.append(statistics.median(stream_samples(STREAM_BYTES, 3)))
        for name in rotated(names, r):
            start = time.perf_counter()
            systems[name]()
            steps[name].append(time.perf_counter() - start)
    return {
        "params": n_params,
        "rounds": rounds,
        "warmup": warmup,
        "stream_gbps": summary(stream),
        "floor_s": summary([BYTES_PER_PARAM * n_params / (bw * 1e9) for bw in stream]),
        "step_s": {n: summary(v) for n, v in steps.items()},
        "params_per_s": {n: summary([n_params / s for s in v]) for n, v in steps.items()},
        "vs_floor": {
            n: summary(
                floor_ratios(v, stream, n_params), TARGETS["cpu_adam_vs_floor"] if n == "ours" else None
            )
            for n, v in steps.items()
        },
        "deepspeed": note or {"build_or_load_s": 0.0},
    }


# ---------------------------------------------------------------------------- 2. NVMe tier
class RawDirect:
    """O_DIRECT pwrite / preadv of whole regions from ``buf`` (the same aligned buffer as the tier's
    slot, so that only the code path differs, not the memory's page size)."""

    def __init__(self, path: Path, offsets: dict[int, int], sizes: dict[int, int], buf: memoryview):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        self.offsets, self.sizes = offsets, sizes
        self.view = buf

    def store(self, g: int) -> None:
        n = self.sizes[g]
        assert os.pwrite(self.fd, self.view[:n], self.offsets[g]) == n

    def load(self, g: int) -> None:
        n = self.sizes[g]
        assert os.preadv(self.fd, [self.view[:n]], self.offsets[g]) == n

    def close(self) -> None:
        os.close(self.fd)


def bench_nvme(directory: str, groups: int, rounds: int) -> dict:
    from longtrain.offload.direct_io import aligned_buffer, bytes_of, padded
    from longtrain.optim.tiers import NvmeTier

    sizes = dict.fromkeys(range(groups), SUBGROUP_STATE)
    tier = NvmeTier(directory, sizes)
    if not tier.direct:
        raise SystemExit(f"{directory} refuses O_DIRECT: point --nvme-dir at a disk")
    slot = aligned_buffer(SUBGROUP_STATE)
    slot.random_(0, 255)
    region = padded(SUBGROUP_STATE)
    raw = RawDirect(
        Path(directory) / f"raw-{os.getpid()}.bin",
        {g: g * region for g in sizes},
        dict.fromkeys(sizes, region),
        bytes_of(slot).data,  # a memoryview of the slot
    )
    total = groups * region

    def each(op: Callable[[int], None]) -> Callable[[], None]:
        def run() -> None:
            for g in sizes:
                op(g)

        return run

    passes = {
        "ours_write": each(lambda g: tier.store(g, slot)),
        "raw_write": each(raw.store),
        "ours_read": each(lambda g: tier.load(g, slot)),
        "raw_read": each(raw.load),
    }
    gbps: dict[str, list[float]] = {k: [] for k in passes}
    try:
        for r in range(rounds + 1):  # round 0: warm-up (allocates the files' blocks)
            for kind in ("write", "read"):
                for who in rotated(["ours", "raw"], r):
                    start = time.perf_counter()
                    passes[f"{who}_{kind}"]()
                    if r:
                        gbps[f"{who}_{kind}"].append(total / (time.perf_counter() - start) / 1e9)
    finally:
        tier.close()
        raw.close()
        Path(directory, f"raw-{os.getpid()}.bin").unlink(missing_ok=True)
    return {
        "directory": directory,
        "subgroups": groups,
        "bytes_per_subgroup": region,
        "rounds": rounds,
        "gbps": {k: summary(v) for k, v in gbps.items()},
        **{
            f"{kind}_vs_raw": summary(
                [a / b for a, b in zip(gbps[f"ours_{kind}"], gbps[f"raw_{kind}"], strict=True)],
                TARGETS[f"nvme_{kind}_vs_raw"],
            )
            for kind in ("read", "write")
        },
    }


# ---------------------------------------------------------------------------- report
def _fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['low'] * scale:.{digits}f}..{s['high'] * scale:.{digits}f}]"


def print_tables(detail: dict) -> None:
    cpu = detail["cpu_update"]
    print(
        f"\n1. CPU update, {cpu['params'] / 1e6:.0f}M float32 parameters, {cpu['rounds']} rounds; "
        f"stream {_fmt(cpu['stream_gbps'], digits=1)} GB/s, floor {_fmt(cpu['floor_s'], 1e3, 1)} ms"
    )
    print("| system | step ms | Mparams/s | vs floor | verdict |\n|---|---|---|---|---|")
    for name in cpu["step_s"]:
        vs = cpu["vs_floor"][name]
        print(
            f"| {name} | {_fmt(cpu['step_s'][name], 1e3, 1)} | {_fmt(cpu['params_per_s'][name], 1e-6, 0)} "
            f"| {_fmt(vs)} | {vs.get('verdict', '')} |"
        )
    if "error" in cpu["deepspeed"]:
        print(f"DeepSpeedCPUAdam: {cpu['deepspeed']['error']}")
    nvme = detail["nvme"]
    print(
        f"\n2. NVMe tier, {nvme['subgroups']} x {nvme['bytes_per_subgroup'] / 1e6:.0f} MB in "
        f"{nvme['directory']}, {nvme['rounds']} rounds (GB/s)"
    )
    print("| pass | ours | raw O_DIRECT | ours / raw | verdict |\n|---|---|---|---|---|")
    for kind in ("read", "write"):
        vs = nvme[f"{kind}_vs_raw"]
        print(
            f"| {kind} | {_fmt(nvme['gbps'][f'ours_{kind}'])} | {_fmt(nvme['gbps'][f'raw_{kind}'])} "
            f"| {_fmt(vs)} | {vs['verdict']} |"
        )
    print(f"\n3. {NOT_BUILT} (step_time_vs_deepspeed, rss_vs_deepspeed, fsdp_state_bytes_vs_replicated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 Mi parameters, 4 NVMe sub-groups (< 3 min)")
    parser.add_argument(
        "--nvme-dir", default=None, help="directory on the disk to test (default: a temp dir)"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    import torch

    torch.set_num_threads(THREADS)
    params, cpu_rounds = (48 * 2**20, 7) if args.quick else (96 * 2**20, 15)
    groups, nvme_rounds = (4, 5) if args.quick else (8, 9)
    t0 = time.time()
    detail: dict = {
        "command": " ".join(["python", *sys.argv]),
        "threads": THREADS,
        "torch": torch.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"1. CPU update: {params / 1e6:.0f}M parameters, {cpu_rounds} rounds", flush=True)
    detail["cpu_update"] = bench_cpu_update(params, cpu_rounds, warmup=2)
    import gc

    gc.collect()
    with tempfile.TemporaryDirectory(prefix="bench_optim_", dir=args.nvme_dir) as d:
        print(f"2. NVMe tier: {groups} sub-groups in {d}, {nvme_rounds} rounds", flush=True)
        detail["nvme"] = bench_nvme(d, groups, nvme_rounds)
    detail["not_built"] = {
        "step_time_vs_deepspeed": NOT_BUILT,
        "rss_vs_deepspeed": NOT_BUILT,
        "fsdp_state_bytes_vs_replicated": NOT_BUILT,
        "nvme_rss_vs_dram": "not measured by this script yet (the trainer run with optim.offload=nvme vs "
        "dram is part 3's single-process half)",
        "nvme_time_vs_dram": "not measured by this script yet (see nvme_rss_vs_dram)",
    }
    detail["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    detail["wall_s"] = round(time.time() - t0, 1)
    print_tables(detail)
    print(json.dumps(final_line(detail)))


if __name__ == "__main__":
    main()

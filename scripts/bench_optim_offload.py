"""Optimizer-state offload against its floors and peers (issue 11's benchmark).

    python scripts/bench_optim_offload.py --quick   # 48 Mi parameters, 7 rounds; 4 x 80 MB NVMe, 5 rounds;
                                                    # end to end: a 33M-parameter Llama, 2 ranks, 2 + 4 steps
    python scripts/bench_optim_offload.py           # 96 Mi parameters, 15 rounds; 8 x 80 MB NVMe, 9 rounds;
                                                    # end to end: a 207M-parameter Llama, 2 ranks, 2 + 6 steps

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
3. End to end, 2 gloo ranks, 1 thread each, the same token rows (synthetic, seeded per step and
   rank; one document per row), activation memory off for all (model states are what differs),
   float32, AdamW with clipping 1.0, sub-groups of 1e7 parameters for every system:
   - ``ours_nvme``: longtrain's trainer (``prepare`` + ``Job.train_step``), parallel.shard=fsdp,
     optim.offload=nvme (O_DIRECT files in the run's temp directory);
   - ``ours_dram``: the same with optim.offload=dram;
   - ``deepspeed_nvme``: the Hugging Face model under a DeepSpeed ZeRO-3 engine as a DeepSpeed user
     writes it (``deepspeed.initialize`` with its AdamW from the config, ``offload_optimizer``
     nvme in another temp directory of the same disk, ``sub_group_size`` 1e7; its AIO op must be
     built: a failure to build it falls back to ``offload_optimizer`` cpu, said in "detail");
   - ``ours_replicated``: parallel.shard=none, offload dram, one step: model-state bytes only.
   Each system runs in its own 2 processes, one after the other; a step's time is rank 0's wall
   time of one optimizer step (the ranks meet in collectives every step), after fixed warm-up
   steps. Peak RSS is each rank's VmHWM summed over ranks (both NVMe paths use O_DIRECT: no page
   cache in either). Model-state bytes per rank: parameters and gradients held by the rank plus
   the optimizer's state bytes (``optim_*_bytes``). Ratios "lower is better": per-step paired
   ratios with the interval of their median; RSS and state bytes are one number per run.

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
from typing import Any

THREADS = 2
BYTES_PER_PARAM = 28  # float32 AdamW: p, g, m, v read (16) + p, m, v written (12)
TENSOR_SHAPE = (4096, 1024)  # parameters as 4 Mi-element matrices (reference/offload.md section 4)
STREAM_BYTES = 256 * 2**20
SUBGROUP_STATE = 80_000_000  # m and v of 1e7 float32 parameters: the default sub-group
TARGETS = {"cpu_adam_vs_floor": 0.9, "nvme_read_vs_raw": 0.8, "nvme_write_vs_raw": 0.8}
# part 3, lower is better
LOWER_TARGETS = {
    "step_time_vs_deepspeed": 1.0,
    "rss_vs_deepspeed": 1.0,
    "nvme_rss_vs_dram": 0.5,
    "nvme_time_vs_dram": 1.3,
    "fsdp_state_bytes_vs_replicated": 0.55,
}
E2E_RANKS = 2
E2E_SPECS = {  # Llama sizes: (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, warmup, steps)
    "quick": (512, 8, 8, 4, 1408, 8192, 256, 2, 4),
    "full": (1024, 12, 16, 8, 2816, 32000, 512, 2, 6),
}


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

    e2e = detail.get("end_to_end", {}).get("ratios", {})
    return {
        "cpu_adam_vs_floor": med(cpu.get("vs_floor", {}), "ours"),
        "nvme_read_vs_raw": med(nvme, "read_vs_raw"),
        "nvme_write_vs_raw": med(nvme, "write_vs_raw"),
        **{key: med(e2e, key) for key in LOWER_TARGETS},
        "detail": detail,
    }


def lower_summary(values: list[float], target: float) -> dict:
    """``summary`` with a lower-is-better ``target``: "hit" when the interval lies at or below it."""
    out = summary(values)
    out["target"] = target
    out["verdict"] = (
        "hit" if out["high"] <= target else ("miss" if out["low"] > target else "at the threshold")
    )
    return out


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


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


# ---------------------------------------------------------------------------- 3. end to end
def _rows(step: int, rank: int, vocab: int, seq_len: int):
    """The token row of ``rank`` at ``step`` (the same for every system)."""
    import torch

    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (1, seq_len), generator=gen)


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker_ours(job: dict, rank: int) -> dict:
    """longtrain's trainer: ``prepare`` then ``Job.train_step`` on the shared rows."""
    import torch

    from longtrain.trainer.batches import StepWork, row_work
    from longtrain.trainer.compose import compose
    from longtrain.trainer.data import MicroBatch
    from longtrain.trainer.train import prepare

    hidden, layers, heads, kv, inter, vocab, seq, warmup, steps = job["spec"]
    overrides = [
        f"model.hidden_size={hidden}",
        f"model.num_layers={layers}",
        f"model.num_heads={heads}",
        f"model.num_kv_heads={kv}",
        f"model.intermediate_size={inter}",
        f"model.vocab_size={vocab}",
        f"train.seq_len={seq}",
        f"train.steps={warmup + steps}",
        "train.grad_accum=1",
        "train.dtype=float32",
        "train.device=cpu",
        "data.micro_batch_size=1",
        "activation.mode=none",
        # DeepSpeed's AdamW below: constant lr, the same hyper-parameters
        "optim.lr=3e-4",
        "optim.betas=[0.9,0.95]",
        "optim.eps=1e-8",
        "optim.weight_decay=0.1",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.grad_clip=1.0",
        "optim.cpu_impl=torch",
        "optim.subgroup_params=10000000",
        f"optim.offload={job['offload']}",
        f"parallel.shard={job['shard']}",
        "checkpoint.enabled=false",
        "logging.progress=false",
        f"output_dir={job['dir']}/out",
    ]
    if job["offload"] == "nvme":
        overrides.append(f"optim.nvme_dir={job['dir']}/nvme")
    run = prepare(compose("tiny_cpu", overrides))
    times, losses = [], []
    try:
        for step in range(warmup + steps):
            ids = _rows(step, rank, vocab, seq)
            mb = MicroBatch(ids, ids.clone(), torch.arange(seq).expand(1, seq).contiguous())
            start = time.perf_counter()
            result = run.train_step(StepWork([row_work(mb)]))
            times.append(time.perf_counter() - start)
            losses.append(result.loss)
        stats = run.optimizer.stats()
        params = [p.to_local() if hasattr(p, "to_local") else p for p in run.model.parameters()]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        optim_bytes = sum(
            int(stats[k] or 0) for k in stats if k.startswith("optim_") and k.endswith("_bytes")
        )
    finally:
        run.close()
    return {
        "step_s": times[warmup:],
        "loss": losses,
        "peak_rss_bytes": _peak_rss_bytes(),
        "state_bytes": 2 * param_bytes + optim_bytes,  # parameters, their gradients, optimizer state
        "optim_stats": {k: v for k, v in stats.items() if k.endswith("_bytes")},
    }


def _worker_deepspeed(job: dict, rank: int) -> dict:
    """The Hugging Face model under a DeepSpeed ZeRO-3 engine, as a DeepSpeed user writes it."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, seq, warmup, steps = job["spec"]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    sizes: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": max(seq, 2048),
        "attn_implementation": "sdpa",
    }
    model = LlamaForCausalLM(LlamaConfig(**sizes))
    offload: dict = {"device": job["offload"]}
    if job["offload"] == "nvme":
        offload["nvme_path"] = f"{job['dir']}/nvme"
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        },
        "zero_optimization": {"stage": 3, "offload_optimizer": offload, "sub_group_size": 10_000_000},
        "steps_per_print": 2**62,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    times, losses = [], []
    for step in range(warmup + steps):
        ids = _rows(step, rank, vocab, seq)
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    # this rank's partitions (a ZeRO-3 parameter's ds_tensor)
    numel = sum(p.ds_tensor.numel() for p in model.parameters())  # type: ignore[attr-defined]
    return {
        "step_s": times[warmup:],
        "loss": losses,
        "peak_rss_bytes": _peak_rss_bytes(),
        # an estimate, not measured: its partitions' parameters, gradients, m and v (its optimizer's
        # extra fp32 copy of the parameters and its swap buffers are not counted)
        "state_bytes": numel * 4 * 4,
    }


def e2e_worker(job_json: str) -> None:
    """One rank of one system (``--e2e-worker``): writes its measurements to ``rank<r>.json``."""
    import torch

    torch.set_num_threads(1)
    job = json.loads(job_json)
    rank = int(os.environ["RANK"])
    out = (_worker_deepspeed if job["system"] == "deepspeed" else _worker_ours)(job, rank)
    Path(job["dir"], f"rank{rank}.json").write_text(json.dumps(out))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_system(job: dict, timeout_s: float) -> dict:
    """Launch ``job`` on E2E_RANKS processes (1 thread each); their results, or the error."""
    import subprocess

    Path(job["dir"]).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "WORLD_SIZE": str(E2E_RANKS),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [sys.executable, __file__, "--e2e-worker", json.dumps(job)]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(E2E_RANKS)
    ]
    start = time.perf_counter()
    try:
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    wall = time.perf_counter() - start
    if any(p.returncode != 0 for p in procs):
        tails = [
            f"rank {r}: {o[-1500:]}"
            for r, (p, o) in enumerate(zip(procs, outputs, strict=True))
            if p.returncode
        ]
        return {"error": "\n".join(tails), "wall_s": round(wall, 1)}
    ranks = [json.loads(Path(job["dir"], f"rank{r}.json").read_text()) for r in range(E2E_RANKS)]
    return {
        "step_s": ranks[0]["step_s"],
        "loss_first_last": [ranks[0]["loss"][0], ranks[0]["loss"][-1]],
        "peak_rss_bytes": sum(r["peak_rss_bytes"] for r in ranks),
        "state_bytes_per_rank": max(r["state_bytes"] for r in ranks),
        "wall_s": round(wall, 1),
        **({"optim_stats": ranks[0]["optim_stats"]} if "optim_stats" in ranks[0] else {}),
    }


def deepspeed_aio_available() -> str | None:
    """None when DeepSpeed's async_io op loads (it is built once, ~8 min); else the reason."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            return "AsyncIOBuilder is not compatible (libaio-dev missing?)"
        AsyncIOBuilder().load(verbose=False)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return None


def bench_end_to_end(spec_name: str, directory: str, timeout_s: float) -> dict:
    spec = E2E_SPECS[spec_name]
    hidden, layers, heads, kv, inter, vocab, seq, warmup, steps = spec
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    params = layers * per_layer + 2 * vocab * hidden + hidden
    aio_error = deepspeed_aio_available()
    ds_offload = "nvme" if aio_error is None else "cpu"
    jobs: dict[str, dict[str, Any]] = {
        "ours_nvme": {"system": "ours", "shard": "fsdp", "offload": "nvme"},
        "ours_dram": {"system": "ours", "shard": "fsdp", "offload": "dram"},
        f"deepspeed_{ds_offload}": {"system": "deepspeed", "offload": ds_offload},
        "ours_replicated": {"system": "ours", "shard": "none", "offload": "dram"},
    }
    results: dict[str, dict] = {}
    for name, system in jobs.items():
        job = {**system, "spec": list(spec), "dir": str(Path(directory) / name)}
        if name == "ours_replicated":
            job["spec"] = [*spec[:7], 0, 1]  # one step: its state bytes only
        print(f"3. end to end: {name}", flush=True)
        results[name] = run_system(job, timeout_s)
    out: dict = {
        "spec": dict(
            zip(
                [
                    "hidden",
                    "layers",
                    "heads",
                    "kv_heads",
                    "intermediate",
                    "vocab",
                    "seq_len",
                    "warmup",
                    "steps",
                ],
                spec,
                strict=True,
            )
        ),
        "params": params,
        "ranks": E2E_RANKS,
        "threads_per_rank": 1,
        "deepspeed_offload": ds_offload,
        **({"deepspeed_aio_error": aio_error} if aio_error else {}),
        "systems": results,
    }
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        out["failed"] = failed
        return out
    ds, nvme, dram = results[f"deepspeed_{ds_offload}"], results["ours_nvme"], results["ours_dram"]
    rep = results["ours_replicated"]
    out["step_s"] = {n: summary(r["step_s"]) for n, r in results.items() if n != "ours_replicated"}
    out["ratios"] = {
        "step_time_vs_deepspeed": lower_summary(
            paired_ratios(nvme["step_s"], ds["step_s"]), LOWER_TARGETS["step_time_vs_deepspeed"]
        ),
        "rss_vs_deepspeed": lower_summary(
            [nvme["peak_rss_bytes"] / ds["peak_rss_bytes"]], LOWER_TARGETS["rss_vs_deepspeed"]
        ),
        "nvme_rss_vs_dram": lower_summary(
            [nvme["peak_rss_bytes"] / dram["peak_rss_bytes"]], LOWER_TARGETS["nvme_rss_vs_dram"]
        ),
        "nvme_time_vs_dram": lower_summary(
            paired_ratios(nvme["step_s"], dram["step_s"]), LOWER_TARGETS["nvme_time_vs_dram"]
        ),
        "fsdp_state_bytes_vs_replicated": lower_summary(
            [dram["state_bytes_per_rank"] / rep["state_bytes_per_rank"]],
            LOWER_TARGETS["fsdp_state_bytes_vs_replicated"],
        ),
    }
    return out


# ---------------------------------------------------------------------------- report
def _fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['low'] * scale:.{digits}f}..{s['high'] * scale:.{digits}f}]"


def print_tables(detail: dict) -> None:
    if "cpu_update" in detail:
        print_cpu_table(detail["cpu_update"])
    if "nvme" in detail:
        print_nvme_table(detail["nvme"])
    if "end_to_end" in detail:
        print_e2e_table(detail["end_to_end"])


def print_cpu_table(cpu: dict) -> None:
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


def print_nvme_table(nvme: dict) -> None:
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


def print_e2e_table(e2e: dict) -> None:
    spec = e2e["spec"]
    print(
        f"\n3. End to end, {e2e['params'] / 1e6:.0f}M-parameter Llama (hidden {spec['hidden']}, "
        f"{spec['layers']} layers, vocab {spec['vocab']}, seq {spec['seq_len']}), {e2e['ranks']} gloo ranks x "
        f"1 thread, {spec['warmup']} warm-up + {spec['steps']} steps; DeepSpeed offload_optimizer "
        f"{e2e['deepspeed_offload']}"
    )
    if "deepspeed_aio_error" in e2e:
        print(
            f"DeepSpeed's AIO op is not available ({e2e['deepspeed_aio_error']}): compared with cpu offload"
        )
    print(
        "| system | step s | peak RSS (sum of ranks) GB | model-state bytes / rank MB (all tiers; "
        "DeepSpeed: an estimate) | loss first -> last |"
    )
    print("|---|---|---|---|---|")
    for name, r in e2e["systems"].items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'].strip().splitlines()[-1]} | | | |")
            continue
        step = _fmt(summary(r["step_s"])) if len(r["step_s"]) > 1 else "(1 step, not timed)"
        print(
            f"| {name} | {step} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['state_bytes_per_rank'] / 1e6:.0f} "
            f"| {r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f} |"
        )
    if "ratios" in e2e:
        print("| ratio (lower is better) | value | target | verdict |\n|---|---|---|---|")
        for key, vs in e2e["ratios"].items():
            value = _fmt(vs) if vs["n"] > 1 else f"{vs['median']:.3f}"
            print(f"| {key} | {value} | <= {vs['target']} | {vs['verdict']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="48 Mi parameters, 4 NVMe sub-groups, a 33M Llama (< 10 min)"
    )
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default: 1,2,3)")
    parser.add_argument("--e2e-worker", default=None, help=argparse.SUPPRESS)  # one rank of part 3
    parser.add_argument(
        "--nvme-dir", default=None, help="directory on the disk to test (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.e2e_worker is not None:
        e2e_worker(args.e2e_worker)
        return
    parts = {int(p) for p in args.parts.split(",")}
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
    import gc

    if 1 in parts:
        print(f"1. CPU update: {params / 1e6:.0f}M parameters, {cpu_rounds} rounds", flush=True)
        detail["cpu_update"] = bench_cpu_update(params, cpu_rounds, warmup=2)
        gc.collect()
    if 2 in parts:
        with tempfile.TemporaryDirectory(prefix="bench_optim_", dir=args.nvme_dir) as d:
            print(f"2. NVMe tier: {groups} sub-groups in {d}, {nvme_rounds} rounds", flush=True)
            detail["nvme"] = bench_nvme(d, groups, nvme_rounds)
        gc.collect()
    if 3 in parts:
        with tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=args.nvme_dir) as d:
            detail["end_to_end"] = bench_end_to_end("quick" if args.quick else "full", d, timeout_s=1200)
    detail["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    detail["wall_s"] = round(time.time() - t0, 1)
    print_tables(detail)
    print(json.dumps(final_line(detail)))


if __name__ == "__main__":
    main()

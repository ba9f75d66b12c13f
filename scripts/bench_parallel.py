"""Hybrid data/context parallelism (issue 12): balanced HDP against a static DP x CP mesh.

    python scripts/bench_parallel.py --quick   # < 10 minutes: the same keys, a shorter measured batch
    python scripts/bench_parallel.py           # measured at train.seq_len 2048, 12 steps per system
    python scripts/bench_parallel.py --sim-only

Simulated (``parallel/simulate.py``: the planner and ``DEFAULT_COST`` unchanged, load-independent
apart from the planner's own time): at 64, 256 and 1024 ranks and contexts 256K and 1M, a
heavy-tailed batch (``heavy_tailed_lengths``: ~80% of documents <= 4K, ~1% >= 128K holding ~40% of
the tokens at 256K, over half at 1M; ~64K tokens per rank, capacity 16K, exactly what ``scripts/simulate_hdp.py --ranks N
--context L`` runs) gives tokens/s of balanced HDP over the static mesh (target >= 2 at 256K) and
balanced imbalance max/mean (target <= 1.10); the planner's time on a global batch of 1024
documents is the median of a fixed number of repeats (target <= 50 ms).

Measured (4 gloo ranks, ``longtrain train tiny_cpu --nproc 4``, one subprocess per system): a
skewed global batch written as a jsonl dataset of exactly one step (``data.shuffle=false``, so every
step trains on the same 8 packed rows): 2 documents of ``seq_len`` tokens and short ones of 32 to
``seq_len / 8`` tokens. Systems on that batch, ``activation.mode=none``, float32:

    hdp       parallel.mode=hdp, token_capacity = seq_len / 2 (the long documents on rings of 2)
    naive     the same with parallel.hdp_balance=false (naive HDP)
    static    parallel.mode=cp, context_parallel 2 x data_parallel 2 (every row on a ring of 2)

Per step the trainer logs every rank's busy seconds, ``imbalance`` (max / mean) and
``tokens_per_s`` (padded tokens of the step over its wall time). Step counts are fixed in advance;
the first ``warmup`` steps are dropped; the keys are medians over the remaining steps (hdp vs static:
of the per-step ratios, paired by step index) with an order-statistic interval for the median.

Peer (``measured_cp_vs_peer``, target <= 1.0): one document of ``--peer-len`` tokens on the same 4
gloo ranks, the tiny_cpu model, float32, plain autograd (no recompute) on both sides:

    ours      longtrain train, parallel.mode=cp, context_parallel 4, cp_impl ring (Ulysses would need
              4 to divide the model's 2 kv heads); per step the slowest rank's busy seconds
    peer      DeepSpeed's ``UlyssesSPAttentionHF.register_with_transformers`` (ALST's Ulysses for HF
              models; its all-to-alls run on gloo, kv heads replicated) on the plain HF model that
              ``trainer/model/hf.py`` builds for tiny_cpu, HF's sdpa as the core; each rank its
              contiguous quarter of the document; per step the slowest rank's forward + loss + backward

The key is the median of the per-step ratios ours / peer (paired by step index), with its interval
and a hit / miss / at-the-threshold verdict; peak RSS (rank 0, ru_maxrss) of each side in ``detail``.
If the peer does not run, the key is null and ``peer`` says what was tried and why it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import code_version, emit, median_interval, paired, print_result, table_header  # noqa: E402

from longtrain.parallel.cost_model import DEFAULT_COST  # noqa: E402
from longtrain.parallel.hdp import plan_hdp  # noqa: E402
from longtrain.parallel.simulate import add_arguments, heavy_tailed_lengths, parse_tokens  # noqa: E402
from longtrain.parallel.simulate import run as simulate_run  # noqa: E402

SIM_RANKS = (64, 256, 1024)
SIM_CONTEXTS = ("256K", "1M")
TARGET_SPEEDUP_256K = 2.0  # balanced HDP tokens/s over the static mesh, at least
TARGET_IMBALANCE = 1.10  # balanced max / mean, at most
TARGET_PLANNER_MS = 50.0  # per global batch of 1024 documents, at most
NPROC = 4
ROWS = 8  # packed rows of the measured global batch
LONG_DOCS = 2  # documents of seq_len tokens in it
SUBDIRS = ("parallel", "trainer")  # the measured sources (print_result warns if they change)


# ------------------------------------------------------------------------------------ verdicts
def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def verdict(value: float | None, target: float, at_least: bool) -> str:
    """hit / miss of one number against a bound (``at_least``: value >= target, else <=)."""
    if value is None:
        return "not measured"
    return "hit" if (value >= target if at_least else value <= target) else "miss"


def summary(values: list[float]) -> dict:
    """Median of per-step values, the interval for it (bench_common.median_interval) and the values."""
    lo, hi, cov = median_interval(values)
    return {
        "median": statistics.median(values),
        "low": lo,
        "high": hi,
        "coverage": round(cov, 3),
        "n": len(values),
        "per_step": [round(v, 4) for v in values],
    }


# ------------------------------------------------------------------------------------ simulated
def simulated(args: argparse.Namespace) -> dict:
    """The simulator's comparison at every rank count and context, and the planner's time on 1024
    documents (median of ``args.planner_repeats``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rows = []
    for context in SIM_CONTEXTS:
        for ranks in SIM_RANKS:
            sim = simulate_run(parser.parse_args(["--ranks", str(ranks), "--context", context]))
            lengths = heavy_tailed_lengths(1024, parse_tokens(context), seed=0)
            times = []
            for _ in range(args.planner_repeats):
                t0 = time.perf_counter()
                plan_hdp(lengths, ranks, sim["capacity"], DEFAULT_COST, balance=True)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append(
                {
                    "ranks": ranks,
                    "context": context,
                    "docs": sim["docs"],
                    "static": f"{sim['static_dp']}x{sim['static_cp']}",
                    "balanced_vs_static": sim["balanced_hdp_vs_static"],
                    "naive_vs_static": sim["hdp_vs_static"],
                    "imbalance": sim["imbalance"],
                    "naive_imbalance": sim["hdp_imbalance"],
                    "static_imbalance": sim["static_imbalance"],
                    "long_token_share": sim["long_token_share"],
                    "planner_ms_batch": sim["planner_ms"],
                    "planner_ms_1024_docs": statistics.median(times),
                }
            )
    return {"rows": rows}


def sim_table(sim: dict) -> None:
    table_header(
        [
            "ranks",
            "context",
            "docs",
            "static DPxCP",
            "balanced / static",
            "naive / static",
            "imbalance balanced",
            "naive",
            "static",
            "long-doc token share",
            "planner ms (batch)",
            "planner ms (1024 docs)",
        ]
    )
    for r in sim["rows"]:
        print(
            f"| {r['ranks']} | {r['context']} | {r['docs']} | {r['static']} | {r['balanced_vs_static']:.2f} | "
            f"{r['naive_vs_static']:.2f} | {r['imbalance']:.3f} | {r['naive_imbalance']:.2f} | "
            f"{r['static_imbalance']:.2f} | {r['long_token_share']:.2f} | {r['planner_ms_batch']:.0f} | "
            f"{r['planner_ms_1024_docs']:.1f} |",
            flush=True,
        )


def sim_keys(sim: dict) -> dict:
    """Headline keys: the worst case over rank counts (and contexts) for each target."""
    rows = sim["rows"]
    at_256k = min(r["balanced_vs_static"] for r in rows if r["context"] == "256K")
    at_1m = min(r["balanced_vs_static"] for r in rows if r["context"] == "1M")
    imbalance = max(r["imbalance"] for r in rows)
    planner = max(r["planner_ms_1024_docs"] for r in rows)
    return {
        "sim_hdp_vs_static_256k": at_256k,
        "sim_hdp_vs_static_256k_verdict": verdict(at_256k, TARGET_SPEEDUP_256K, at_least=True),
        "sim_hdp_vs_static_1m": at_1m,
        "sim_imbalance": imbalance,
        "sim_imbalance_verdict": verdict(imbalance, TARGET_IMBALANCE, at_least=False),
        "planner_ms": planner,
        "planner_ms_verdict": verdict(planner, TARGET_PLANNER_MS, at_least=False),
    }


# ------------------------------------------------------------------------------------ measured
def skewed_lengths(seq_len: int, rows: int = ROWS, long_docs: int = LONG_DOCS, seed: int = 0) -> list[int]:
    """Token counts (end-of-text included) of a batch that packs into ``rows`` rows of ``seq_len``:
    ``long_docs`` documents of ``seq_len`` and short ones, log-uniform in [32, seq_len / 8], filling
    the other rows to ~95% (best-fit packing then needs no extra row)."""
    rng = random.Random(seed)
    lo, hi = 32, max(33, seq_len // 8)
    lengths = [seq_len] * long_docs
    budget = int(0.95 * (rows - long_docs) * seq_len)
    while True:
        s = int(lo * (hi / lo) ** rng.random())
        if s > budget:
            break
        lengths.append(s)
        budget -= s
    rng.shuffle(lengths)
    return lengths


def write_dataset(lengths: list[int], path: Path) -> None:
    """A jsonl file whose documents tokenize (bundled tokenizer, end-of-text appended) to ``lengths``:
    consecutive slices of the bundled corpus's tokens, decoded (the bundled BPE round-trips)."""
    from longtrain.trainer.data.bundled import corpus_documents
    from longtrain.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bundled")
    need = sum(lengths)
    ids: list[int] = []
    for doc in corpus_documents():
        ids += tok.encode(doc)
        if len(ids) >= need:
            break
    with path.open("w") as f:
        pos = 0
        for s in lengths:
            text = tok.decode(ids[pos : pos + s - 1])  # + end-of-text = s tokens
            assert len(tok.encode(text)) == s - 1, "the bundled tokenizer did not round-trip a slice"
            f.write(json.dumps({"text": text}) + "\n")
            pos += s - 1


def system_overrides(system: str, seq_len: int) -> list[str]:
    capacity = seq_len // 2
    if system in ("hdp", "naive"):
        out = [
            "parallel.mode=hdp",
            f"parallel.token_capacity={capacity}",
            f"train.global_batch_tokens={ROWS * seq_len}",
            "train.grad_accum=1",
        ]
        return out + (["parallel.hdp_balance=false"] if system == "naive" else [])
    if system == "static":  # dp 2 x cp 2: cp sized so the longest document fits the capacity
        cp = seq_len // capacity
        dp = NPROC // cp
        return ["parallel.mode=cp", f"parallel.context_parallel={cp}", f"train.grad_accum={ROWS // dp}"]
    if system == "ours_cp":  # the peer comparison: one document over all ranks
        return ["parallel.mode=cp", f"parallel.context_parallel={NPROC}", "train.grad_accum=1"]
    raise ValueError(f"unknown system {system!r}")


def train_command(system: str, steps: int, seq_len: int, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "longtrain.trainer.cli",  # the `longtrain` command of the longtrain this script imports
        "train",
        "tiny_cpu",
        "--nproc",
        str(NPROC),
        f"output_dir={out}",
        f"train.seq_len={seq_len}",
        f"train.steps={steps}",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "data.source=jsonl",
        f"data.path={data}",
        "data.shuffle=false",
        "data.micro_batch_size=1",
        "activation.mode=none",
        "activation.tile_rows=0",
        "checkpoint.enabled=false",
        "logging.progress=false",
        *system_overrides(system, seq_len),
    ]


def run_system(
    system: str,
    args: argparse.Namespace,
    data: Path,
    work: Path,
    steps: int | None = None,
    seq_len: int | None = None,
) -> list[dict]:
    out = work / system
    cmd = train_command(system, steps or args.steps, seq_len or args.seq_len, data, out)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=args.env, timeout=args.run_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{system}: rc {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "busy_s" in r]
    print(f"  {system}: {len(logged)} steps in {time.time() - t0:.0f} s", flush=True)
    return logged


def measured_summary(runs: dict[str, list[dict]], warmup: int) -> dict:
    """Medians over the steps after ``warmup``; hdp vs static paired by step index."""
    kept = {s: [r for r in recs if r["step"] > warmup] for s, recs in runs.items()}
    out: dict = {s: {"imbalance": summary([r["imbalance"] for r in recs])} for s, recs in kept.items()}
    for s, recs in kept.items():
        out[s]["tokens_per_s"] = summary([r["tokens_per_s"] for r in recs])
        out[s]["planned_imbalance"] = recs[0].get("planned_imbalance") if recs else None
        out[s]["plan"] = {k: recs[0].get(k) for k in PLAN_KEYS} if recs else {}
    hdp = [r["tokens_per_s"] for r in kept["hdp"]]
    static = [r["tokens_per_s"] for r in kept["static"]]
    out["hdp_vs_static"] = summary([a / b for a, b in zip(hdp, static, strict=True)])
    return out


PLAN_KEYS = ("hdp_jobs", "hdp_rings", "hdp_rank_jobs_min", "hdp_rank_jobs_max")  # metrics.jsonl, mode hdp
MEASURED_KEYS = (
    "measured_imbalance_balanced",
    "measured_imbalance_unbalanced",
    "measured_imbalance_static",
    "measured_hdp_vs_static",
)


def measured_keys(m: dict) -> dict:
    return {
        "measured_imbalance_balanced": m["hdp"]["imbalance"]["median"],
        "measured_imbalance_unbalanced": m["naive"]["imbalance"]["median"],
        "measured_imbalance_static": m["static"]["imbalance"]["median"],
        "measured_hdp_vs_static": m["hdp_vs_static"]["median"],
    }


def measured_table(m: dict) -> None:
    table_header(
        [
            "system",
            "imbalance median [interval]",
            "tokens/s median [interval]",
            "planned imbalance",
            "jobs (rings)",
            "jobs per rank",
        ]
    )
    for s in ("hdp", "naive", "static"):
        i, t, p, plan = m[s]["imbalance"], m[s]["tokens_per_s"], m[s]["planned_imbalance"], m[s]["plan"]
        planned = f"{p:.3f}" if p is not None else "-"
        jobs = f"{plan['hdp_jobs']} ({plan['hdp_rings']})" if plan.get("hdp_jobs") is not None else "-"
        per_rank = f"{plan['hdp_rank_jobs_min']}-{plan['hdp_rank_jobs_max']}" if jobs != "-" else "-"
        print(
            f"| {s} | {i['median']:.3f} [{i['low']:.3f}, {i['high']:.3f}] | "
            f"{t['median']:.0f} [{t['low']:.0f}, {t['high']:.0f}] | {planned} | {jobs} | {per_rank} |"
        )
    r = m["hdp_vs_static"]
    print(
        f"hdp / static tokens/s per step: median {r['median']:.3f} [{r['low']:.3f}, {r['high']:.3f}]",
        flush=True,
    )


def measured(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    try:
        lengths = skewed_lengths(args.seq_len)
        data = work / "skewed.jsonl"
        write_dataset(lengths, data)
        print(
            f"measured: {NPROC} gloo ranks, {len(lengths)} documents ({LONG_DOCS} of {args.seq_len} tokens, "
            f"the rest {min(lengths)}..{sorted(lengths)[-LONG_DOCS - 1]}), {args.steps} steps per system, "
            f"first {args.warmup} dropped",
            flush=True,
        )
        runs = {s: run_system(s, args, data, work) for s in ("hdp", "naive", "static")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = measured_summary(runs, args.warmup)
    m["batch_lengths"] = lengths
    return m


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter measured part, same keys (< 10 min)")
    parser.add_argument("--sim-only", action="store_true", help="the simulated part only")
    parser.add_argument(
        "--seq-len", type=int, help="train.seq_len of the measured batch (full 2048, quick 1024)"
    )
    parser.add_argument("--steps", type=int, help="steps per measured system (full 12, quick 5)")
    parser.add_argument("--warmup", type=int, help="first steps dropped (full 2, quick 1)")
    parser.add_argument(
        "--planner-repeats", type=int, help="plan_hdp calls per planner time (median; full 21, quick 7)"
    )
    parser.add_argument(
        "--peer-len", type=int, help="tokens of the peer comparison's document (full 8192, quick 4096)"
    )
    parser.add_argument(
        "--peer-steps", type=int, help="steps of each side of the peer comparison (full 10, quick 5)"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the peer comparison (key null)")
    parser.add_argument("--run-timeout", type=float, default=1200.0, help="seconds per training run")
    args = parser.parse_args(argv)
    defaults = (1024, 5, 1, 7, 4096, 5) if args.quick else (2048, 12, 2, 21, 8192, 10)
    names = ("seq_len", "steps", "warmup", "planner_repeats", "peer_len", "peer_steps")
    for name, value in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len % 16 or args.seq_len < 256:
        parser.error(f"--seq-len must be a multiple of 16 and >= 256, got {args.seq_len}")
    if args.warmup < 0 or args.steps - args.warmup < 2:
        parser.error(f"--steps ({args.steps}) must leave at least 2 steps after --warmup ({args.warmup})")
    if args.peer_len % (2 * NPROC) or args.peer_len < 256:
        parser.error(f"--peer-len must be a multiple of {2 * NPROC} and >= 256, got {args.peer_len}")
    if args.peer_steps - args.warmup < 2:
        parser.error(
            f"--peer-steps ({args.peer_steps}) must leave at least 2 steps after --warmup ({args.warmup})"
        )
    if args.planner_repeats < 1:
        parser.error(f"--planner-repeats must be >= 1, got {args.planner_repeats}")
    return args


PEER_NAME = "DeepSpeed UlyssesSPAttentionHF (ALST's Ulysses for HF models), sdpa core, 4 gloo ranks"
TARGET_PEER = 1.0  # ours' step time over the peer's, at most


def write_document(length: int, path: Path) -> None:
    """A jsonl dataset of one document of ``length`` tokens (end-of-text included)."""
    write_dataset([length], path)


def build_peer(length: int, world: int, vocab_size: int):
    """The plain HF model trainer/model/hf.py builds for tiny_cpu (seed 0), HF's sdpa core replaced
    by DeepSpeed's Ulysses wrapper over the sequence-parallel group of all ``world`` ranks (the
    process group must exist: ``deepspeed.init_distributed``)."""
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from longtrain.trainer.compose import compose
    from longtrain.trainer.model.hf import build_hf_model

    torch.manual_seed(0)
    model = build_hf_model(compose("tiny_cpu").model, vocab_size=vocab_size, seq_len=length)
    attn = getattr(model.config, "_attn_implementation", None)
    assert attn == "sdpa", f"the peer wraps HF's sdpa core; the model uses {attn}"
    UlyssesSPAttentionHF.register_with_transformers(
        model, "sdpa", world, 1, seq_length=length, seq_length_is_variable=False
    )
    return model


def peer_loss_sum(model, ids, rank: int, world: int):
    """This rank's token-loss sum over its contiguous 1/world of the document ``ids`` [1, L]
    (labels shifted on the whole document first, as ALST's data adapter does)."""
    import torch

    length = ids.shape[1]
    assert length % world == 0, f"the peer needs the document ({length}) to divide the {world} ranks"
    rows = slice(rank * length // world, (rank + 1) * length // world)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # [1, L]
    position_ids = torch.arange(length).unsqueeze(0)  # [1, L]
    logits = model(input_ids=ids[:, rows], position_ids=position_ids[:, rows]).logits  # [1, L/P, V]
    flat = logits.view(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, labels[:, rows].reshape(-1), reduction="sum")


def peer_worker(job: dict) -> None:
    """One rank of the peer under torchrun: rank 0 emits per-step max-over-ranks seconds and its RSS."""
    import resource

    import deepspeed
    import torch
    import torch.distributed as dist

    from longtrain.trainer.data.tokenizer import load_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = load_tokenizer("bundled")
    text = json.loads(Path(job["data"]).read_text().splitlines()[0])["text"]
    ids = torch.tensor([tok.encode(text) + [tok.eos_id]])  # [1, L]: the trainer's document
    model = build_peer(ids.shape[1], world, tok.vocab_size)
    per_step = []
    for _ in range(job["steps"]):
        t0 = time.perf_counter()
        peer_loss_sum(model, ids, rank, world).backward()
        model.zero_grad(set_to_none=True)
        seconds = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        per_step.append(float(seconds))
    if rank == 0:
        emit({"step_s": per_step, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    dist.destroy_process_group()


def run_peer(args: argparse.Namespace, data: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NPROC}",
        os.path.abspath(__file__),
        "--peer-worker",
        json.dumps({"data": str(data), "steps": args.peer_steps}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=args.env, timeout=args.run_timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the peer exited with rc {proc.returncode}: {tail[0][:300]}")
    return json.loads(lines[-1][2:])


def peer_comparison(args: argparse.Namespace) -> dict:
    """Ours (cp ring over 4 ranks) and the peer on one document; on failure the reason, key null."""
    work = Path(tempfile.mkdtemp(prefix="bench_parallel_peer_"))
    try:
        data = work / "one_document.jsonl"
        write_document(args.peer_len, data)
        print(
            f"peer: one document of {args.peer_len} tokens, {args.peer_steps} steps each, first {args.warmup} dropped",
            flush=True,
        )
        try:
            peer = run_peer(args, data)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return {"measured_cp_vs_peer": None, "peer": f"{PEER_NAME}: tried, did not run: {e}"}
        ours = run_system("ours_cp", args, data, work, steps=args.peer_steps, seq_len=args.peer_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return peer_summary(ours, peer, args.warmup)


def peer_summary(ours: list[dict], peer: dict, warmup: int) -> dict:
    ours_s = [r["busy_max_s"] for r in ours if r["step"] > warmup]
    peer_s = peer["step_s"][warmup:]
    ratio_ = paired(ours_s, peer_s, TARGET_PEER)
    rss_ours = max(r["mem_peak_bytes"] for r in ours)
    return {
        "measured_cp_vs_peer": ratio_["median"],
        "measured_cp_vs_peer_verdict": ratio_["verdict"],
        "peer": PEER_NAME,
        "peer_detail": {
            "step_s_ratio": ratio_,
            "ours_step_s": summary(ours_s),
            "peer_step_s": summary(peer_s),
            "ours_rss_rank0": rss_ours,
            "peer_rss_rank0": peer["rss"],
            "rss_ratio": ratio(rss_ours, peer["rss"]),
        },
    }


def main() -> None:
    args = parse_args()
    args.code_start = code_version(SUBDIRS)
    args.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    t_start = time.time()
    loadavg = list(os.getloadavg())
    print(
        f"simulated: ranks {SIM_RANKS}, contexts {SIM_CONTEXTS}, planner repeats {args.planner_repeats}",
        flush=True,
    )
    sim = simulated(args)
    sim_table(sim)
    keys = sim_keys(sim)
    detail: dict = {"simulated": sim, "loadavg_start": loadavg}
    if args.sim_only:
        keys.update(dict.fromkeys(MEASURED_KEYS))
    else:
        m = measured(args)
        measured_table(m)
        keys.update(measured_keys(m))
        detail["measured"] = m
        detail["measured_setup"] = {"seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup}
    peer: dict
    if args.sim_only or args.no_peer:
        peer = {"measured_cp_vs_peer": None, "peer": f"{PEER_NAME}: not run (--sim-only / --no-peer)"}
    else:
        peer = peer_comparison(args)
    keys.update({k: v for k, v in peer.items() if k != "peer_detail"})
    if "peer_detail" in peer:
        detail["peer"] = peer["peer_detail"]
        print(f"ours / peer step time: {json.dumps(peer['peer_detail']['step_s_ratio'])}", flush=True)
    detail["loadavg_end"] = list(os.getloadavg())
    result = {**keys, "detail": detail}
    print_result(result, args, t_start, "bench_parallel.py", SUBDIRS)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-worker":
        peer_worker(json.loads(sys.argv[2]))
    else:
        main()

"""Step-time simulation of a static DP x CP mesh, naive HDP and balanced HDP on one global batch.

Reuses the planner (hdp.plan_hdp) and its cost model unchanged; only the static mesh is modelled
here. Static mesh: CP = the smallest divisor of the rank count whose CP x capacity holds the
context; documents are packed in data order into rows of ``context`` tokens (a packing loader);
every row runs as one zigzag ring over its CP group (short documents pay ring hops too); rows go to
the DP groups round robin. Tokens/s = the batch's tokens / the step's makespan. Times come from
the cost model, so ratios are what to read, not absolute numbers.

``run(argv)`` is the command line (``scripts/simulate_hdp.py``, later ``longtrain simulate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longtrain.config_checks import ConfigError

from .cost_model import DEFAULT_COST, CostModel
from .hdp import HdpPlan, plan_hdp
from .hdp_rounds import build_rounds


def parse_tokens(text: str | int) -> int:
    """'256K' -> 262144, '1M' -> 1048576, '8192' -> 8192."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024**2}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ConfigError(f"a token count must be like 8192, 256K or 1M, got {text!r}") from None


def heavy_tailed_lengths(n_docs: int, context: int, seed: int = 0) -> list[int]:
    """~80% of documents <= 4K (log-uniform 64..4K), ~19% in (4K, 128K) (Pareto, alpha 1.1), ~1%
    >= 128K (log-uniform 128K..context): at a 256K context the 1% hold about 40% of the tokens."""
    rng = np.random.default_rng(seed)
    n_long = max(1, round(0.01 * n_docs)) if context >= 131072 else 0
    n_short = round(0.8 * n_docs)
    n_mid = n_docs - n_long - n_short
    short = np.exp(rng.uniform(math.log(64), math.log(4096), n_short))
    hi = min(131072, context)
    u = rng.uniform(0.0, 1.0 - (4096 / hi) ** 1.1, n_mid)
    mid = 4096 * (1.0 - u) ** (-1 / 1.1)
    long_ = np.exp(rng.uniform(math.log(131072), math.log(max(context, 131073)), n_long))
    lengths = np.minimum(np.concatenate([short, mid, long_]).astype(np.int64), context)
    rng.shuffle(lengths)
    return [int(s) for s in lengths]


def static_mesh(lengths: Sequence[int], n_ranks: int, capacity: int, context: int, cost: CostModel) -> dict:
    """Makespan and per-rank timeline of a static DP x CP mesh sized for ``context``."""
    need = -(-context // capacity)
    cp = next((c for c in range(need, n_ranks + 1) if n_ranks % c == 0), None)
    if cp is None:
        raise ConfigError(f"context {context} does not fit {n_ranks} ranks x {capacity} tokens")
    dp = n_ranks // cp
    rows: list[list[int]] = [[]]
    for s in lengths:  # a packing loader: consecutive documents fill a row of `context` tokens
        if sum(rows[-1]) + s > context and rows[-1]:
            rows.append([])
        rows[-1].append(s)
    busy = [0.0] * dp
    timeline: list[list[tuple[float, float, str]]] = [[] for _ in range(n_ranks)]
    for i, row in enumerate(rows):
        grp, c = i % dp, cost.job_time(row, cp)
        for r in range(grp * cp, (grp + 1) * cp):
            timeline[r].append((busy[grp], c, "ring"))
        busy[grp] += c
    makespan = max(busy)
    return {
        "cp": cp,
        "dp": dp,
        "makespan": makespan,
        "imbalance": makespan / (sum(busy) / dp),
        "timeline": timeline,
    }


def plan_timeline(plan: HdpPlan) -> list[list[tuple[float, float, str]]]:
    """Per rank: (start, seconds, kind) of its jobs, executed in the global order."""
    free = [0.0] * plan.n_ranks
    timeline: list[list[tuple[float, float, str]]] = [[] for _ in range(plan.n_ranks)]
    for job in plan.jobs:
        start = max(free[r] for r in job.ranks)
        for r in job.ranks:
            timeline[r].append((start, job.cost, job.layout))
            free[r] = start + job.cost
    return timeline


def simulate(
    lengths: Sequence[int],
    n_ranks: int,
    context: int,
    capacity: int,
    cost: CostModel = DEFAULT_COST,
    repeats: int = 5,
) -> dict:
    """Static mesh vs naive HDP vs balanced HDP on one global batch (``_timelines`` holds the
    per-rank timelines for ``plot_timelines``)."""
    lengths = [int(s) for s in lengths]
    if max(lengths) > context:
        raise ConfigError(
            f"a document of {max(lengths)} tokens is longer than the context {context}; raise --context"
        )
    tokens = sum(lengths)
    static = static_mesh(lengths, n_ranks, capacity, context, cost)
    fit = static_mesh(lengths, n_ranks, capacity, max(lengths), cost)
    naive = plan_hdp(lengths, n_ranks, capacity, cost, balance=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        balanced = plan_hdp(lengths, n_ranks, capacity, cost, balance=True)
        times.append((time.perf_counter() - t0) * 1e3)
    rounds = build_rounds(balanced, cost)  # what parallel.shard=fsdp runs
    arr = np.array(lengths)
    result = {
        "ranks": n_ranks,
        "context": context,
        "capacity": capacity,
        "docs": len(lengths),
        "tokens": tokens,
        "short_doc_fraction": float((arr <= 4096).mean()),
        "long_token_share": float(arr[arr >= 131072].sum() / tokens),
        "static_cp": static["cp"],
        "static_dp": static["dp"],
        "static_tokens_per_s": tokens / static["makespan"],
        "static_fit_cp": fit["cp"],
        "static_fit_tokens_per_s": tokens / fit["makespan"],
        "hdp_tokens_per_s": tokens / naive.makespan,
        "balanced_hdp_tokens_per_s": tokens / balanced.makespan,
        "hdp_vs_static": static["makespan"] / naive.makespan,
        "balanced_hdp_vs_static": static["makespan"] / balanced.makespan,
        "balanced_hdp_vs_static_fit": fit["makespan"] / balanced.makespan,
        "imbalance": balanced.imbalance,
        "hdp_imbalance": naive.imbalance,
        "static_imbalance": static["imbalance"],
        "fsdp_rounds_tokens_per_s": tokens / rounds.makespan,
        "fsdp_rounds": len(rounds.rounds),
        "fsdp_empty_fraction": rounds.empty_fraction,
        "balanced_jobs": len(balanced.jobs),
        "balanced_rings": sum(1 for j in balanced.jobs if len(j.ranks) > 1),
        "planner_ms": statistics.median(times),
        "_timelines": {
            f"static DP{static['dp']} x CP{static['cp']}": static["timeline"],
            "naive HDP": plan_timeline(naive),
            "balanced HDP": plan_timeline(balanced),
        },
    }
    return result


def plot_timelines(result: dict, path: str | Path) -> str:
    """Per-rank timelines of the three systems to a PNG; returns a message (matplotlib optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: skipped the plot {path}"
    panels = result["_timelines"]
    colors = {"ring": "tab:red", "pack": "tab:blue"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3 * len(panels)), sharex=True)
    for ax, (title, timeline) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        for r, bars in enumerate(timeline):
            for kind in ("ring", "pack"):
                segs = [(s, d) for s, d, k in bars if k == kind]
                if segs:
                    ax.broken_barh(segs, (r, 0.9), facecolors=colors[kind], linewidth=0)
        ax.set_title(title)
        ax.set_ylabel("rank")
    np.atleast_1d(axes)[-1].set_xlabel("seconds (cost model)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--context", default="256K", help="longest document the static mesh is sized for")
    parser.add_argument("--capacity", default="16K", help="tokens per rank (from the memory plan)")
    parser.add_argument("--lengths", help="a JSON list of document lengths (default: heavy-tailed)")
    parser.add_argument("--docs", type=int, help="documents to generate (default: ~tokens-per-rank x ranks)")
    parser.add_argument("--tokens-per-rank", default="64K", help="global batch size when generating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--comm", type=float, default=DEFAULT_COST.comm, help="seconds per token per ring hop"
    )
    parser.add_argument(
        "--cost",
        help="a job's fitted cost model (output_dir/hdp_cost.json of parallel.hdp_cost=profile) instead of "
        "the default; --comm still sets the ring hop",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--png", help="plot per-rank timelines to this PNG")


def read_cost_file(path: Path) -> CostModel:
    """The ``cost`` object of an ``hdp_cost.json`` (trainer/batches.py ``hdp_cost_model``)."""
    if not path.is_file():
        raise ConfigError(f"--cost {path}: no such file")
    try:
        fields = json.loads(path.read_text())["cost"]
        return CostModel(**{k: float(fields[k]) for k in ("attn", "linear", "fixed", "comm")})
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f'--cost {path}: not an hdp_cost.json (wants {{"cost": {{"attn", "linear", "fixed", "comm"}}}}): {e!r}'
        ) from None


def run(args: argparse.Namespace) -> dict:
    context, capacity = parse_tokens(args.context), parse_tokens(args.capacity)
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
    if args.lengths:
        path = Path(args.lengths)
        if not path.is_file():
            raise ConfigError(f"--lengths {path}: no such file")
        lengths = [int(s) for s in json.loads(path.read_text())]
    else:
        n = args.docs
        if n is None:
            mean = float(np.mean(heavy_tailed_lengths(4096, context, args.seed)))
            n = max(1024, math.ceil(args.ranks * parse_tokens(args.tokens_per_rank) / mean))
        lengths = heavy_tailed_lengths(n, context, args.seed)
    cost = CostModel(DEFAULT_COST.attn, DEFAULT_COST.linear, DEFAULT_COST.fixed, args.comm)
    if args.cost:
        cost = dataclasses.replace(read_cost_file(Path(args.cost)), comm=args.comm)
    result = simulate(lengths, args.ranks, context, capacity, cost)
    if args.png:
        result["png"] = plot_timelines(result, args.png)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print_result(result, args.json)
    return 0


def print_result(result: dict, as_json: bool) -> None:
    """The public figures of ``run``'s result: one JSON object, or one line per figure."""
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if as_json:
        print(json.dumps(public))
    else:
        for k, v in public.items():
            print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")

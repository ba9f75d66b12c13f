"""What the benchmark scripts share: worker processes, the peak-RSS probe, the length search, paired
ratios with an interval for the median, and report formatting.

A benchmark script runs each system in a subprocess of itself (``spawn``: ``python SCRIPT MODE JOB``);
a worker prints its results as lines starting with ``@@`` followed by JSON (``emit``), which the
parent reads with ``read`` / ``ask``. Everything else a worker prints goes to the shared log file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

SEARCH_LIMIT = 1 << 21  # a safety stop for the doubling, far above any length these machines reach


# ------------------------------------------------------------------------------------ worker side
def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def emit(obj: dict) -> None:
    print("@@" + json.dumps(obj), flush=True)


def start_rss_watchdog(budget: int) -> None:
    """Stop the process (after emitting ``fits: false``) as soon as its RSS passes ``budget``: a
    length-search probe need not finish a step that is already over."""
    import psutil

    proc = psutil.Process()

    def watchdog() -> None:
        while True:
            rss = proc.memory_info().rss
            if rss > budget:
                emit({"fits": False, "rss": rss, "stopped_early": True})
                os._exit(0)
            time.sleep(0.01)

    threading.Thread(target=watchdog, daemon=True).start()


# ------------------------------------------------------------------------------------ parent side
def spawn(script: str, mode: str, job: dict, log: IO[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(script), mode, json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        bufsize=1,
        env=env,
    )


def read(proc: subprocess.Popen, what: str, log: IO[str]) -> dict:
    """The worker's next ``@@`` result; its stderr's tail in the error if it exits without one."""
    assert proc.stdout is not None  # spawn pipes it
    for line in proc.stdout:
        if line.startswith("@@"):
            return json.loads(line[2:])
    rc = proc.wait()
    log.flush()
    log.seek(0)
    raise RuntimeError(
        f"{what}: worker exited (rc={rc}) without a result; stderr ends with:\n{log.read()[-4000:]}"
    )


def ask(proc: subprocess.Popen, command: str, what: str, log: IO[str]) -> dict:
    assert proc.stdin is not None  # spawn pipes it
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return read(proc, what, log)


def search_lengths(fits: Callable[[int], bool], start: int, resolution: int) -> tuple[int, bool]:
    """Longest length (a multiple of ``resolution``) for which ``fits`` holds, assuming it is monotone:
    doubling from ``start`` until a length does not fit (no cap below the answer), then bisection.
    Returns (the length, True when no failing length was found before SEARCH_LIMIT); 0 when even
    ``start`` does not fit."""
    lo, hi, s = 0, None, start
    while s <= SEARCH_LIMIT:  # doubling, until a length does not fit
        if not fits(s):
            hi = s
            break
        lo, s = s, 2 * s
    while hi is not None and hi - lo > resolution:  # bisection on multiples of the resolution
        mid = (lo + hi) // 2 // resolution * resolution
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi is None


# ------------------------------------------------------------------------------------ statistics
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


def paired(ours: list[float], peer: list[float], target: float) -> dict:
    """Median of the per-round ratios ours/peer, its interval, and the verdict against an upper
    bound ``target``: hit when the interval lies under it, at the threshold when it spans it."""
    ratios = [a / b for a, b in zip(ours, peer, strict=True)]
    lo, hi, cov = median_interval(ratios)
    verdict = "at the threshold" if lo <= target <= hi else ("hit" if hi < target else "miss")
    return {
        "median": statistics.median(ratios),
        "low": lo,
        "high": hi,
        "coverage": cov,
        "n": len(ratios),
        "target": target,
        "verdict": verdict,
        "per_step": [round(r, 3) for r in ratios],
    }


# ------------------------------------------------------------------------------------ report
def code_version(subdirs: tuple[str, ...] = ("offload", os.path.join("trainer", "model"))) -> str:
    """git HEAD plus a hash of the measured packages' sources (others may commit while this runs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    digest = hashlib.sha1()
    for sub in subdirs:
        for name in sorted(os.listdir(os.path.join(root, sub))):
            if name.endswith(".py"):
                with open(os.path.join(root, sub, name), "rb") as f:
                    digest.update(f.read())
    return f"{head.stdout.strip() or 'unknown'}+src:{digest.hexdigest()[:10]}"


def table_header(cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def print_result(
    result: dict,
    args,
    t_start: float,
    script: str,
    subdirs: tuple[str, ...] = ("offload", os.path.join("trainer", "model")),
) -> None:
    """The last stdout line of a benchmark: ``result`` as JSON, its detail stamped with the wall
    time, the command, and (with a warning) the measured sources' version if they changed during
    the run (``args.code_start``: ``code_version(subdirs)`` at the start)."""
    end = code_version(subdirs)
    if end.split("+")[1] != args.code_start.split("+")[1]:  # the measured sources, not HEAD
        print(
            f"WARNING: {' or '.join(d + '/' for d in subdirs)} changed during the run ({args.code_start} -> {end})"
        )
        result["detail"]["code_end"] = end
    result["detail"]["wall_s"] = round(time.time() - t_start, 1)
    result["detail"]["command"] = " ".join(["python", f"scripts/{script}", *sys.argv[1:]])
    print(json.dumps(result))

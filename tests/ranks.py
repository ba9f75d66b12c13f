"""Launch a multi-process gloo test: ``world`` copies of a worker script, one per rank (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; one intra-op thread each), each writing
``rank<R>.json`` into ``out_dir`` (its first argument). Shared by the tests in tests/distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_ranks(
    worker: Path, world: int, port: int, out_dir: Path, *args: str, timeout: float = 60
) -> list[dict]:
    """Run the ranks to completion (each must exit 0: its output's tail is the failure message) and
    return their JSON results in rank order."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out_dir), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]

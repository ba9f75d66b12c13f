"""``offload.direct_io.check_dir`` from several ranks at once on one directory (optim.nvme_dir and
activation.file_dir are shared by the ranks of a job)."""

from __future__ import annotations

import multiprocessing
import time

from longtrain.offload.direct_io import check_dir


def _probe_many(directory: str, errors, start) -> None:
    start.wait()  # both processes probe at the same time
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            check_dir(directory, "optim.nvme_dir")
    except Exception as e:  # a ConfigError when another rank removed this one's probe file
        errors.put(str(e))


def test_ranks_probing_one_directory_do_not_remove_each_others_probe(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    errors, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_probe_many, args=(str(tmp_path), errors, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert errors.empty(), errors.get()
    assert not list(tmp_path.iterdir())

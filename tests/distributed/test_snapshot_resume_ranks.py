"""Multi-rank runs (`longtrain train --nproc N`) with in-memory snapshots, each compared with an
uninterrupted run (losses bit for bit, one metrics line per step):
- two ranks, rank 1 killed with SIGKILL mid-run (torchrun then stops rank 0): the re-run
  reconnects both ranks to their agents and resumes from the newest snapshot both hold;
- two ranks, SIGTERM to the launcher: both stop after the same step with a disk checkpoint of it;
- three ranks, rank 1's trainer and agent killed and its shared memory gone (node loss): the
  re-run rebuilds its snapshot from the other ranks' snapshots and XOR parity.
Agents gone at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from longtrain.checkpoint.agent import AgentClient, agent_dir

pytestmark = pytest.mark.slow  # each test: three multi-rank runs, ~1 min on 2 cores

RUN = [
    "train.seq_len=64",
    "data.micro_batch_size=1",
    "train.grad_accum=1",
    "logging.progress=false",
    "logging.peak_flops=1e12",
    "train.steps=16",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "checkpoint.every=100",
    "checkpoint.snapshot_every=2",
]


def read_metrics(output_dir) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def stop_agents(out, world: int) -> None:
    directory = agent_dir(str(out), create=False)
    for rank in range(world):
        client = AgentClient.connect(directory, rank) if directory.exists() else None
        if client is not None:
            client.shutdown()


def two_ranks(out, cmd=(sys.executable, "-m", "longtrain.trainer.cli")) -> list[str]:
    return [*cmd, "train", "tiny_cpu", "--nproc", "2", *RUN, f"output_dir={out}"]


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    """An uninterrupted two-rank run (shared by the two-rank tests)."""
    run_a = tmp_path_factory.mktemp("two_rank_reference")
    try:
        a = subprocess.run(two_ranks(run_a), capture_output=True, text=True, timeout=240)
        assert a.returncode == 0, a.stderr[-3000:]
        assert gone(run_a)
        yield run_a
    finally:
        stop_agents(run_a, 2)


@pytest.fixture
def run_b(tmp_path):
    yield tmp_path / "b"
    stop_agents(tmp_path / "b", 3)


def same_losses(run_a, run_b, steps: int) -> None:
    rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["step"], ra["loss"], ra["grad_norm"], ra["lr"]) == (
            rb["step"],
            rb["loss"],
            rb["grad_norm"],
            rb["lr"],
        )


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "longtrain.trainer" in cmdline and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def gone(out, timeout: float = 10.0) -> bool:
    directory = agent_dir(str(out), create=False)
    deadline = time.monotonic() + timeout
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not directory.exists()


def test_two_ranks_resume_from_agent_memory_after_a_rank_is_killed(two_rank_reference, run_b, longtrain_cmd):
    def command(out):
        return two_ranks(out, longtrain_cmd)

    launcher = subprocess.Popen(command(run_b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(run_b)) < 5 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = rank_process(launcher, 1)
        assert victim is not None and launcher.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    logged = [r["step"] for r in read_metrics(run_b)]
    assert 5 <= len(logged) < 16

    b = subprocess.run(command(run_b), capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stderr[-3000:]
    resumed = re.findall(r"resumed from agent memory \(.*\) \(step (\d+)\)", b.stdout)
    assert len(resumed) == 1, b.stdout  # rank 0 says it
    step = int(resumed[0])
    assert step % 2 == 0 and max(logged) - 2 <= step <= max(logged), (step, logged)  # <= one interval lost

    same_losses(two_rank_reference, run_b, 16)
    assert gone(run_b)


def test_sigterm_to_the_launcher_saves_a_checkpoint_every_rank_agrees_on(
    two_rank_reference, run_b, longtrain_cmd
):
    """Preemption under torchrun: SIGTERM to the launcher reaches both ranks (at different moments);
    they stop after the same step with a disk checkpoint of it and stop their agents; the re-run
    resumes from it and matches the uninterrupted run."""
    launcher = subprocess.Popen(
        two_ranks(run_b, longtrain_cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(run_b)) < 4 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert launcher.poll() is None, "the run ended before the signal"
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "longtrain: stopped by SIGTERM; re-run the same command to continue" in err
    stopped = re.findall(
        r"preempted \(SIGTERM\): stopped after step (\d+), saved a checkpoint of it to (\S+);", out
    )
    assert len(stopped) == 1, out
    step = int(stopped[0][0])
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, step + 1))
    assert stopped[0][1] == str(run_b / "checkpoints" / f"step-{step:06d}")
    assert gone(run_b)

    b = subprocess.run(two_ranks(run_b, longtrain_cmd), capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stderr[-3000:]
    assert f"resumed from {stopped[0][1]} (step {step})" in b.stdout
    same_losses(two_rank_reference, run_b, 16)
    assert gone(run_b)


def test_three_ranks_rebuild_a_lost_node_from_parity(tmp_path, longtrain_cmd):
    """Node loss: rank 1's trainer and its agent killed with SIGKILL and its shared memory gone;
    the re-run rebuilds rank 1's snapshot from ranks 0 and 2 (XOR parity, checkpoint.ec's default)
    and continues bit-identically to an uninterrupted three-rank run."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run = [*RUN[:5], "train.steps=10", *RUN[6:]]

    def command(out):
        return [*longtrain_cmd, "train", "tiny_cpu", "--nproc", "3", *run, f"output_dir={out}"]

    try:
        a = subprocess.run(command(run_a), capture_output=True, text=True, timeout=240)
        assert a.returncode == 0, a.stderr[-3000:]
        sizes = [(r["snapshot_bytes"], r["snapshot_parity_bytes"]) for r in read_metrics(run_a)[2:]]
        # rank 0's parity: half the largest snapshot (1/(N-1)); the ranks' snapshots differ only
        # in a few bytes of JSON (their data positions)
        assert sizes and all(abs(2 * parity - snap) < 1e-4 * snap for snap, parity in sizes), sizes

        launcher = subprocess.Popen(command(run_b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        directory = agent_dir(str(run_b), create=False)
        try:
            deadline = time.monotonic() + 180
            while len(read_metrics(run_b)) < 5 and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            victim = rank_process(launcher, 1)
            agent = AgentClient.connect(directory, 1)
            assert victim is not None and agent is not None, "the run ended before it could be killed"
            agent_pid = agent.pid()
            agent.disconnect()
            os.kill(agent_pid, signal.SIGKILL)
            victim.send_signal(signal.SIGKILL)
            for path in directory.glob("rank1.*"):  # the node's memory is gone with it
                path.unlink()
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                launcher.kill()
        assert launcher.returncode != 0
        logged = [r["step"] for r in read_metrics(run_b)]
        assert 5 <= len(logged) < 10

        b = subprocess.run(command(run_b), capture_output=True, text=True, timeout=240)
        assert b.returncode == 0, b.stderr[-3000:]
        assert re.search(r"rank 1: rebuilt the snapshot of step \d+ \(\d+ bytes\)", b.stderr), b.stderr[
            -3000:
        ]
        resumed = re.findall(r"resumed from agent memory \(.*\) \(step (\d+)\)", b.stdout)
        assert len(resumed) == 1, b.stdout
        step = int(resumed[0])
        assert step % 2 == 0 and max(logged) - 2 <= step <= max(logged), (step, logged)

        rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
        assert [r["step"] for r in rows_b] == list(range(1, 11))
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert (ra["step"], ra["loss"], ra["grad_norm"], ra["lr"]) == (
                rb["step"],
                rb["loss"],
                rb["grad_norm"],
                rb["lr"],
            )
        assert gone(run_b)
    finally:
        for out in (run_a, run_b):
            directory = agent_dir(str(out), create=False)
            for rank in range(3):
                client = AgentClient.connect(directory, rank) if directory.exists() else None
                if client is not None:
                    client.shutdown()

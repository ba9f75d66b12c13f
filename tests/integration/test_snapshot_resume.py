"""Resume from agent memory: a ``longtrain train`` run with checkpoint.snapshot_every, killed with
SIGKILL in step 7 (after the step-6 snapshot, before any disk checkpoint), re-run with the same
command: it resumes from the snapshot its agent kept, and metrics.jsonl then reads exactly like an
uninterrupted run's (one line per step, the same losses bit for bit). Preemption: SIGTERM in step 5
saves step 5 to disk and exits 0, and the re-run continues from it alike. The agents are gone at
the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from longtrain.checkpoint.agent import AgentClient, agent_dir

RUN = [
    "train.seq_len=128",
    "data.micro_batch_size=2",
    "train.grad_accum=1",
    "logging.progress=false",
    "logging.peak_flops=1e12",
    "train.steps=10",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "checkpoint.every=100",  # on disk only after the last step
    "checkpoint.snapshot_every=2",
    # a fixed alpha: alpha=auto is measured from timings and the fp32 forward's floats depend on
    # the row it cuts at. A resume reads the alpha its first run recorded (activation_alpha.rank*.json
    # in output_dir, test_tokenwise), but the uninterrupted reference run here is another job, in
    # another output_dir, and would measure its own
    "activation.alpha=0.5",
]

# The failing run: the CLI with a step replaced. kill_9: step 7 waits for the step-6 snapshot,
# then kill -9 this process (a crash mid-step once the snapshot is complete). sigterm: SIGTERM
# to this process at the start of step 5 (a preemption notice arriving mid-step).
FAILING = textwrap.dedent(
    """
    import os, signal, sys
    from longtrain.trainer.cli import main
    from longtrain.trainer.train import Job

    real_step, calls = Job.train_step, []

    def train_step(self, work):
        calls.append(1)
        if ACTION == "kill_9" and len(calls) == 7:
            self.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if ACTION == "sigterm" and len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, work)

    Job.train_step = train_step
    sys.exit(main(sys.argv[1:]))
    """
)


def failing(action: str) -> str:
    return f"ACTION = {action!r}\n" + FAILING


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def stop_agents(out) -> None:
    directory = agent_dir(str(out), create=False)
    if directory.exists():
        client = AgentClient.connect(directory, 0)
        if client is not None:
            client.shutdown()


def command(out, cmd=(sys.executable, "-m", "longtrain.trainer.cli")) -> list[str]:
    return [*cmd, "train", "tiny_cpu", *RUN, f"output_dir={out}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run without a failure (shared by the tests of this file)."""
    run_a = tmp_path_factory.mktemp("uninterrupted")
    try:
        a = subprocess.run(command(run_a), capture_output=True, text=True, timeout=120)
        assert a.returncode == 0, a.stderr[-3000:]
        assert agent_gone(run_a)  # a finished run stops its agent
        yield run_a
    finally:
        stop_agents(run_a)


@pytest.fixture
def run_b(tmp_path):
    """The interrupted run's output dir; its agent is stopped at the end whatever happened."""
    yield tmp_path / "b"
    stop_agents(tmp_path / "b")


def same_losses(run_a, run_b) -> None:
    rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in rows_b] == list(range(1, 11))  # one line per step across the failure
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["step"], ra["loss"], ra["grad_norm"], ra["lr"]) == (
            rb["step"],
            rb["loss"],
            rb["grad_norm"],
            rb["lr"],
        )
    final_a = load_file(run_a / "checkpoints" / "step-000010" / "model.safetensors")
    final_b = load_file(run_b / "checkpoints" / "step-000010" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(final_a[k].equal(final_b[k]) for k in final_a)


def agent_gone(out, timeout: float = 10.0) -> bool:
    directory = agent_dir(str(out), create=False)
    deadline = time.monotonic() + timeout
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not directory.exists()


def test_kill_9_resumes_from_agent_memory_bit_exact(uninterrupted, run_b, longtrain_cmd):
    killed = subprocess.run(
        [sys.executable, "-c", failing("kill_9"), *command(run_b, ())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, 7))
    assert not (run_b / "checkpoints").exists() or not any((run_b / "checkpoints").iterdir())
    assert agent_dir(str(run_b), create=False).exists()  # its agent outlived it

    b = subprocess.run(command(run_b, longtrain_cmd), capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr[-3000:]
    resumed = [line for line in b.stdout.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "resumed from agent memory" in resumed[0], b.stdout
    assert resumed[0].endswith("(step 6)"), resumed
    same_losses(uninterrupted, run_b)
    assert agent_gone(run_b)  # the re-run's last step stopped the agent: no process, no /dev/shm files


def test_sigterm_saves_the_step_to_disk_and_exits_cleanly(uninterrupted, run_b, longtrain_cmd):
    """Preemption: SIGTERM in step 5 (between the step-4 snapshot and the step-6 one): the run
    finishes step 5, writes a disk checkpoint of it, stops its agent and exits 0; the re-run
    resumes from that checkpoint and reads like an uninterrupted run."""
    stopped = subprocess.run(
        [sys.executable, "-c", failing("sigterm"), *command(run_b, ())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    said = [line for line in stopped.stdout.splitlines() if "preempted" in line]
    assert said == [
        f"longtrain: preempted (SIGTERM): stopped after step 5, saved a checkpoint of it to "
        f"{run_b / 'checkpoints' / 'step-000005'}; re-run the same command to continue"
    ], stopped.stdout
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, 6))
    assert (run_b / "checkpoints" / "step-000005" / "manifest.json").is_file()
    assert agent_gone(run_b)  # the checkpoint covers everything the agent held

    b = subprocess.run(command(run_b, longtrain_cmd), capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr[-3000:]
    resumed = [line for line in b.stdout.splitlines() if "resumed from" in line]
    assert resumed == [f"longtrain: resumed from {run_b / 'checkpoints' / 'step-000005'} (step 5)"], b.stdout
    same_losses(uninterrupted, run_b)
    assert agent_gone(run_b)

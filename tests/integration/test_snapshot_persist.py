"""Disk checkpoints persisted by the snapshot agents (checkpoint/persist.py) while the trainer
trains on: the files equal the synchronous checkpointer's and resume bit-exact; a trainer killed
right after asking still gets its checkpoint (the agent finishes it); an agent killed mid-persist
leaves the previous checkpoint intact and loadable, and a restarted agent persists again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_snapshot

from longtrain.checkpoint import SyncCheckpointer, list_steps, newest_verified, verify
from longtrain.checkpoint.agent import AgentClient, AgentError, agent_dir
from longtrain.checkpoint.persist import tmp_dir
from longtrain.checkpoint.slots import required_bytes
from longtrain.trainer.compose import compose
from longtrain.trainer.train import train

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

RUN = [
    "train.seq_len=64",
    "data.micro_batch_size=1",
    "train.grad_accum=1",
    "logging.progress=false",
    "logging.peak_flops=1e12",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "model.num_layers=1",
    "model.tie_embeddings=true",  # tied weights: stored once on disk, whoever writes
    "activation.alpha=0.5",  # alpha=auto is measured per process (see test_snapshot_resume.py)
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "train.steps=4",
]
AGENTS = ["checkpoint.snapshot_every=1"]  # every step a snapshot, every second one persisted


def stop_agents(out: Path) -> None:
    directory = agent_dir(str(out), create=False)
    client = AgentClient.connect(directory, 0) if directory.exists() else None
    if client is not None:
        client.shutdown()


def gone(directory: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not directory.exists()


def dead(pid: int) -> bool:
    """Exited (an agent this process started stays a zombie until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def same_checkpoint(a: Path, b: Path) -> None:
    """The same parameters (byte for byte), trainer state and optimizer + scheduler state."""
    verify(a)
    verify(b)
    assert sorted(json.loads((a / "manifest.json").read_text())["files"]) == sorted(
        json.loads((b / "manifest.json").read_text())["files"]
    )
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "trainer_state.json").read_text()) == json.loads(
        (b / "trainer_state.json").read_text()
    )
    opt_a = torch.load(a / "optimizer.pt", weights_only=True)
    opt_b = torch.load(b / "optimizer.pt", weights_only=True)
    assert opt_a["scheduler"] == opt_b["scheduler"]
    assert opt_a["optimizer"]["param_groups"] == opt_b["optimizer"]["param_groups"]
    state_a, state_b = opt_a["optimizer"]["state"], opt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for k in state_a:
        assert state_a[k].keys() == state_b[k].keys()
        for name, t in state_a[k].items():
            assert t.dtype == state_b[k][name].dtype and torch.equal(t, state_b[k][name]), (k, name)


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory):
    """The reference: the same run with checkpoints written by the trainer (no snapshots)."""
    out = tmp_path_factory.mktemp("synchronous")
    logged = train(compose("tiny_cpu", [*RUN, f"output_dir={out}"]))
    return out, logged


def test_agent_written_checkpoints_equal_the_trainers_and_resume_bit_exact(
    synchronous, tmp_path, monkeypatch
):
    sync_out, sync_logged = synchronous
    out = tmp_path / "agents"
    with monkeypatch.context() as m:

        def no_synchronous_write(*args, **kwargs):
            raise AssertionError("the trainer wrote a checkpoint itself")

        m.setattr(SyncCheckpointer, "write", no_synchronous_write)
        logged = train(compose("tiny_cpu", [*RUN, *AGENTS, f"output_dir={out}"]))
    assert [r["loss"] for r in logged] == [r["loss"] for r in sync_logged]
    for step in ("step-000002", "step-000004"):
        same_checkpoint(sync_out / "checkpoints" / step, out / "checkpoints" / step)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]  # no temp dirs
    assert gone(agent_dir(str(out), create=False))  # the last step's checkpoint written: agents stopped

    # resume from the agents' step 2 in a new run: steps 3 and 4 as in the uninterrupted run
    resumed_out = tmp_path / "resumed"
    resume = f"checkpoint.resume={out / 'checkpoints' / 'step-000002'}"
    resumed = train(compose("tiny_cpu", [*RUN, resume, f"output_dir={resumed_out}"]))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in sync_logged[2:]
    ]
    same_checkpoint(sync_out / "checkpoints" / "step-000004", resumed_out / "checkpoints" / "step-000004")


# The trainer killed (SIGKILL) right after its copy thread asked the agent to persist step 2.
KILLED_AFTER_ASKING = textwrap.dedent(
    """
    import os, signal, sys
    from longtrain.checkpoint.snapshot import SnapshotCheckpointer
    from longtrain.trainer.cli import main

    real = SnapshotCheckpointer._ask_persist

    def ask_then_die(self, job, slot):
        real(self, job, slot)
        os.kill(os.getpid(), signal.SIGKILL)

    SnapshotCheckpointer._ask_persist = ask_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_trainer_killed_after_asking_still_gets_its_checkpoint(synchronous, tmp_path):
    out = tmp_path / "killed"
    try:
        args = ["train", "tiny_cpu", *RUN, *AGENTS, f"output_dir={out}"]
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_ASKING, *args], capture_output=True, text=True, timeout=120
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        step2 = out / "checkpoints" / "step-000002"
        deadline = time.monotonic() + 30
        while not (step2 / "manifest.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        same_checkpoint(synchronous[0] / "checkpoints" / "step-000002", step2)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    finally:
        stop_agents(out)


@pytest.fixture
def shm_dir(tmp_path):
    directory = agent_dir(str(tmp_path / "run"))
    yield directory
    client = AgentClient.connect(directory, 0)
    if client is not None:
        try:
            client.shutdown()
        except (AgentError, OSError):
            pass
    elif directory.exists():  # a killed agent's slots and socket
        shutil.rmtree(directory, ignore_errors=True)


def test_an_agent_killed_mid_persist_leaves_the_previous_checkpoint(shm_dir, tmp_path):
    root = tmp_path / "checkpoints"
    job = {"root": str(root), "rank": 0, "keep": 1, "seal": True, "timeout": 60.0}
    state1, meta1 = tiny_snapshot(1, seed=1)
    state2, meta2 = tiny_snapshot(2, seed=2)
    client = AgentClient.start(shm_dir, 0, idle_exit=60)
    pair = client.slots(required_bytes(state1, meta1))
    pair.write(1, state1, meta1)
    client.request(
        op="persist", job={**job, "step": 1, "token": "aa", "world": 1, "slot": str(pair.holding(1).path)}
    )
    assert client.request(op="persisted") == {"step": 1, "path": str(root / "step-000001")}

    # Step 2 as one of two ranks: rank 0's agent writes its part, then waits for rank 1's, which
    # never comes; it is killed there, mid-persist.
    pair.write(2, state2, meta2)
    client.request(
        op="persist", job={**job, "step": 2, "token": "bb", "world": 2, "slot": str(pair.holding(2).path)}
    )
    tmp = tmp_dir(root, 2, "bb")
    deadline = time.monotonic() + 30
    while not (tmp / ".rank0.done").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tmp / "model.safetensors").is_file()
    pid = client.pid()
    os.kill(pid, signal.SIGKILL)
    client.disconnect()
    deadline = time.monotonic() + 10
    while not dead(pid) and time.monotonic() < deadline:  # its socket then refuses the re-run's connection
        time.sleep(0.01)
    assert list_steps(root) == [root / "step-000001"] and newest_verified(root) == root / "step-000001"
    weights = load_file(root / "step-000001" / "model.safetensors")
    assert torch.equal(weights["0.weight"], state1["/model/0.weight"])
    assert json.loads((root / "step-000001" / "trainer_state.json").read_text())["step"] == 1

    # A restarted agent (the re-run's) persists step 2 from the same slot: sealed, step 1 pruned
    # (keep=1) only now, and the abandoned attempt's directory removed.
    client = AgentClient.start(shm_dir, 0, idle_exit=60)
    client.request(
        op="persist", job={**job, "step": 2, "token": "cc", "world": 1, "slot": str(pair.holding(2).path)}
    )
    assert client.request(op="persisted") == {"step": 2, "path": str(root / "step-000002")}
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    verify(root / "step-000002")
    pair.close()
    client.shutdown()

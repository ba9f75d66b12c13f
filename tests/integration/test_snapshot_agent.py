"""Snapshot agents (checkpoint/agent.py): an agent outlives a kill -9 of its trainer, which
reconnects and reads its snapshot back bit-exact; the lazy copy runs after start() returns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import longtrain
from longtrain.checkpoint.agent import AgentClient, AgentError, LazySnapshot, agent_dir
from longtrain.checkpoint.slots import required_bytes

PACKAGE_PARENT = str(Path(longtrain.__file__).parent.parent)  # not resolved: may be a symlink


def alive(pid: int) -> bool:
    """Running (an exited agent this process started stays a zombie until reaped: not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def training_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(64, 32, generator=g),
        "model.b": torch.randn(32, generator=g, dtype=torch.float64),
        "optimizer.state.0.exp_avg": torch.randn(64, 32, generator=g).bfloat16(),
        "optimizer.state.0.step": torch.tensor(float(seed)),
        "rng.cpu": g.get_state(),
    }


@pytest.fixture
def shm_dir(tmp_path):
    """A private agent directory for this test; any agent left running is stopped at the end."""
    directory = agent_dir(str(tmp_path / "run"))
    yield directory
    client = AgentClient.connect(directory, 0)
    if client is not None:
        try:
            client.shutdown()
        except (AgentError, OSError):  # it was closing already
            pass


def test_agent_outlives_a_killed_trainer_which_reconnects_and_reads_its_snapshot(tmp_path, shm_dir):
    trainer = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_snapshot_agent import training_state
        from longtrain.checkpoint.agent import AgentClient, LazySnapshot
        from longtrain.checkpoint.slots import required_bytes
        client = AgentClient.start(Path({str(shm_dir)!r}), 0, idle_exit=60)
        lazy = LazySnapshot(client.slots(required_bytes(training_state(1), {{"step": 1}})))
        lazy.start(1, training_state(1), {{"step": 1}})
        lazy.wait()
        def hang(i):
            if i == 2:
                print(client.pid(), flush=True)
                time.sleep(60)
        lazy.start(2, training_state(2), {{"step": 2}}, after_tensor=hang)  # killed halfway
        lazy.wait()
        """
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    child = subprocess.Popen([sys.executable, "-c", trainer], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        agent_pid = int(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert alive(agent_pid)

    client = AgentClient.connect(shm_dir, 0)  # the restarted trainer: the same agent answers
    assert client is not None and client.pid() == agent_pid
    pair = client.slots(required_bytes(training_state(1), {"step": 1}))
    snap, _ = pair.read_newest()
    assert snap is not None and snap.step == 1 and snap.meta == {"step": 1}
    expected = training_state(1)
    assert snap.tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert snap.tensors[name].dtype == t.dtype and torch.equal(snap.tensors[name], t), name
    for s in pair.slots:
        assert oct(s.path.stat().st_mode & 0o777) == oct(0o600)
    pair.close()

    client.shutdown()
    assert wait_gone(agent_pid)
    assert not shm_dir.exists()  # slots, socket and the job's directory removed


def test_lazy_copy_runs_after_start_returns_and_wait_reports_its_failure(shm_dir):
    client = AgentClient.start(shm_dir, 0, idle_exit=60)
    state = training_state(3)
    lazy = LazySnapshot(client.slots(required_bytes(state, {})))
    returned = threading.Event()

    def copying(i: int) -> None:
        # a synchronous start() would never get here with `returned` set
        assert returned.wait(timeout=10), "start() waited for the copy"

    lazy.start(3, state, {}, after_tensor=copying)
    returned.set()
    lazy.wait()
    snap, _ = lazy.pair.read_newest()
    assert snap is not None and snap.step == 3 and torch.equal(snap.tensors["model.w"], state["model.w"])

    def fail(i: int) -> None:
        raise OSError("disk gone")

    lazy.start(4, state, {}, after_tensor=fail)
    with pytest.raises(OSError, match="disk gone"):
        lazy.wait()
    lazy.wait()  # the failure is reported once
    lazy.pair.close()
    client.shutdown()


def test_an_agent_without_a_trainer_exits_and_removes_its_slots(shm_dir):
    client = AgentClient.start(shm_dir, 0, idle_exit=0.5)
    pid = client.pid()
    client.slots(4096).close()
    assert sorted(p.name for p in shm_dir.iterdir()) == [
        "rank0.log",
        "rank0.slot0",
        "rank0.slot1",
        "rank0.sock",
    ]
    client.disconnect()
    assert wait_gone(pid)
    assert not shm_dir.exists()

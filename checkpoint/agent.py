"""Snapshot agents: one process per rank that owns the rank's snapshot slots and outlives its
trainer, and the trainer's side of it (``AgentClient``, ``LazySnapshot``).

Why a separate process: a snapshot must survive the crash it is meant to recover from. The agent
is started with ``start_new_session=True`` (its own session and process group), so neither a
``kill -9`` of the trainer nor the signal torchrun or a terminal sends to the trainer's group
reaches it; the restarted trainer finds it again through a unix socket at a path derived from
the job's ``output_dir`` and the rank (``agent_dir``), in the same private directory as the slots.

Requests are JSON lines over the socket (never pickle: anything that can connect must not be
able to run code in the agent): ``ping`` (pid), ``slots`` (the two slot files, created or grown
to the size asked; ``kind`` parity: the two that hold the parity this rank keeps for the other
ranks' snapshots), ``persist`` (write this rank's part of a disk checkpoint from a slot, and on
rank 0 seal it once every rank's part is there: ``persist.py``), ``persisted`` (wait for that and
say how it went), ``hold`` (wait until no persist reads a slot the trainer is about to overwrite),
``close`` (finish a persist, remove the slots and exit). An agent with no trainer connected for
``idle_exit`` seconds finishes a persist, removes its slots and exits, so a job that is never
re-run leaks no memory.

The trainer copies its state into the slot itself (``LazySnapshot``: a background thread started
after the optimizer step, overlapping the next forward/backward; ``wait`` before the next step).
The agent's process holds the files, not the copy: the trainer maps the same pages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import longtrain

from .persist import Persister
from .slots import Slot, SlotPair, create_slot_file, private_dir

SHM_ROOT = Path("/dev/shm")


def agent_dir(output_dir: str, shm_root: Path = SHM_ROOT, create: bool = True) -> Path:
    """The private directory of a job's agents: keyed by the job's resolved output_dir, so a
    re-run of the same command finds its agents and another job never does. ``create``: make
    it (and check it is private) if need be; else only the path."""
    key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
    user = shm_root / f"longtrain-{os.getuid()}"
    if not create:
        return user / key
    return private_dir(private_dir(user) / key)  # both levels ours, 0700


def agent_paths(directory: Path, rank: int) -> tuple[Path, tuple[Path, Path]]:
    """The socket and the two slot files of ``rank``'s agent in a job's ``directory``."""
    return directory / f"rank{rank}.sock", (directory / f"rank{rank}.slot0", directory / f"rank{rank}.slot1")


def parity_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    """The two slot files of the parity ``rank`` keeps for other ranks' snapshots (rank_parity.py)."""
    return directory / f"rank{rank}.parity0", directory / f"rank{rank}.parity1"


def agent_log(directory: Path, rank: int) -> Path:
    """Where ``rank``'s agent writes its stderr (removed with its slots)."""
    return directory / f"rank{rank}.log"


class _Agent:
    def __init__(self, directory: Path, rank: int, idle_exit: float):
        self.sock_path, self.slot_paths = agent_paths(directory, rank)
        self.parity_paths = parity_paths(directory, rank)
        self.rank = rank
        self.idle_exit = idle_exit
        self.lock = threading.Lock()
        self.clients = 0
        self.idle_since = time.monotonic()
        self.done = threading.Event()
        self.persister = Persister()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "slots":
            size = int(request["bytes"])
            paths = self.parity_paths if request.get("kind") == "parity" else self.slot_paths
            with self.lock:
                for path in paths:
                    if not path.exists() or path.stat().st_size < size:
                        create_slot_file(path, size)
            return {"paths": [str(p) for p in paths]}
        if op == "persist":
            return self.persister.start(request["job"])
        if op == "persisted":
            return self.persister.result()
        if op == "hold":
            return self.persister.hold(str(request["slot"]))
        if op == "close":
            self.done.set()
            return {"closed": True}
        return {"error": f"unknown request {op!r}"}

    def cleanup(self) -> None:
        for path in (
            *self.slot_paths,
            *self.parity_paths,
            self.sock_path,
            agent_log(self.sock_path.parent, self.rank),
        ):
            path.unlink(missing_ok=True)
        try:  # the job's directory goes with its last agent
            self.sock_path.parent.rmdir()
        except OSError:
            pass


def serve(directory: Path, rank: int, idle_exit: float) -> None:
    """Run an agent until ``close`` or ``idle_exit`` seconds without a connected trainer."""
    agent = _Agent(directory, rank, idle_exit)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            with agent.lock:
                agent.clients += 1
            try:
                for line in self.rfile:
                    try:
                        reply = agent.handle(json.loads(line))
                    except (ValueError, KeyError, OSError) as e:
                        reply = {"error": f"{type(e).__name__}: {e}"}
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                    if agent.done.is_set():
                        return
            finally:
                with agent.lock:
                    agent.clients -= 1
                    agent.idle_since = time.monotonic()

    agent.sock_path.unlink(missing_ok=True)  # left by an agent that was killed
    server = socketserver.ThreadingUnixStreamServer(str(agent.sock_path), Handler)
    server.daemon_threads = True
    os.chmod(agent.sock_path, 0o600)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        while not agent.done.wait(0.2):
            with agent.lock:
                idle = agent.clients == 0 and time.monotonic() - agent.idle_since > idle_exit
            if idle:
                break
    finally:
        agent.persister.join()  # a checkpoint being written is finished first, whoever asked for it
        server.shutdown()
        server.server_close()
        agent.cleanup()


class AgentError(RuntimeError):
    pass


class AgentClient:
    """The trainer's connection to its rank's agent (``connect`` to a running one, or ``start``)."""

    def __init__(self, directory: Path, rank: int, sock: socket.socket):
        self.directory, self.rank = directory, rank
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.lock = threading.Lock()  # the loop's thread and the snapshot's copy thread both ask

    @classmethod
    def connect(cls, directory: Path, rank: int) -> AgentClient | None:
        """The running agent of ``rank``, or None when there is none (no socket, or a dead agent's)."""
        sock_path, _ = agent_paths(directory, rank)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(sock_path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        client = cls(directory, rank, sock)
        try:  # a killed agent's other threads may hold its socket open a moment after it is a zombie
            client.pid()
        except (AgentError, OSError):
            client.disconnect()
            return None
        return client

    @classmethod
    def start(
        cls, directory: Path, rank: int, idle_exit: float = 600.0, timeout: float = 60.0
    ) -> AgentClient:
        """Connect to the rank's agent, starting one first if none runs."""
        client = cls.connect(directory, rank)
        if client is not None:
            return client
        # The package's parent on the child's path: the agent imports this very longtrain.
        package_parent = str(Path(longtrain.__file__).parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
        }
        cmd = [sys.executable, "-m", "longtrain.checkpoint.agent", str(directory), str(rank), str(idle_exit)]
        # Its own stderr file, not the trainer's: an agent holding the trainer's pipes open would
        # keep whoever reads them (a launcher, a test) waiting after the trainer is gone.
        log_fd = os.open(agent_log(directory, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = subprocess.Popen(
                cmd,
                start_new_session=True,  # not in the trainer's process group: survives its signals
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                env=env,
            )
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = cls.connect(directory, rank)
            if client is not None:
                return client
            if process.poll() is not None:
                said = agent_log(directory, rank).read_text().strip().splitlines()[-1:]
                agent_log(directory, rank).unlink(missing_ok=True)
                raise AgentError(
                    f"the snapshot agent of rank {rank} exited at start (status {process.returncode}"
                    + (f": {said[0]}" if said else "")
                    + ")"
                )
            time.sleep(0.05)
        raise AgentError(f"the snapshot agent of rank {rank} did not answer within {timeout:.0f} s")

    def request(self, **request: Any) -> dict[str, Any]:
        with self.lock:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            line = self.reader.readline()
        if not line:
            raise AgentError(f"the snapshot agent of rank {self.rank} closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(f"snapshot agent of rank {self.rank}: {reply['error']}")
        return reply

    def pid(self) -> int:
        return int(self.request(op="ping")["pid"])

    def slots(self, nbytes: int, kind: str = "snapshot") -> SlotPair:
        """The rank's two slots, each at least ``nbytes`` (growing one discards what it held);
        ``kind`` "parity": the two that hold the parity it keeps for other ranks."""
        paths = self.request(op="slots", bytes=nbytes, kind=kind)["paths"]
        return SlotPair((Path(paths[0]), Path(paths[1])))

    def disconnect(self) -> None:
        """Leave the agent running (it keeps the snapshots for a restart)."""
        self.reader.close()
        self.sock.close()

    def shutdown(self) -> None:
        """Stop the agent; its slots are removed."""
        self.request(op="close")
        self.disconnect()


class LazySnapshot:
    """Copies a state into a slot pair on a background thread. ``start`` returns at once: the
    tensors are read while the next forward/backward runs, which is safe because nothing changes
    parameters or optimizer state before the next optimizer step, and ``wait`` is called before it."""

    def __init__(self, pair: SlotPair):
        self.pair = pair
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.seq = 0

    def start(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        after_tensor: Callable[[int], None] | None = None,
        then: Callable[[Slot | None], None] | None = None,
        before: Callable[[Slot], None] | None = None,
    ) -> None:
        """``then(slot)`` runs on the same thread after the write, with the slot written (None
        when the write failed): persistence and parity across ranks, which every rank must join
        either way. ``before(slot)``: on the same thread, before the slot chosen is written."""
        self.wait()  # one snapshot in flight: a second would write the slot the first is filling

        def copy() -> None:
            written = None
            try:
                self.seq = self.pair.write(step, tensors, meta, after_tensor, before)
                written = self.pair.holding(step)
            except BaseException as e:  # handed to the trainer at wait()
                self._error = e
            if then is not None:
                try:
                    then(written)
                except BaseException as e:
                    self._error = self._error or e

        self._thread = threading.Thread(target=copy, name="longtrain-snapshot", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the copy is done; re-raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m longtrain.checkpoint.agent", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("rank", type=int)
    parser.add_argument("idle_exit", type=float)
    args = parser.parse_args(argv)
    serve(private_dir(args.directory), args.rank, args.idle_exit)


if __name__ == "__main__":
    main()

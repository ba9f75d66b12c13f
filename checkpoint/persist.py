"""Persistence by the snapshot agents: a disk checkpoint written from a snapshot slot by the
agent processes, in the format ``sync.py`` writes (so resume, ``longtrain export`` and a resume on
another number of ranks read it unchanged), while the trainer goes on training.

Who writes what. Snapshots exist only of replicated states (``parallel.shard=none``), so every
rank's slot holds the whole state; the checkpoint's files are spread over the ranks' agents
(``PARTS``: rank 0 the parameters and ``trainer_state.json``, rank 1 the optimizer state; one rank
writes all three), each written from the slot's bytes without copying them out first
(``Slot.view``), fsynced, hashed, and announced by a done-mark ``.rank<r>.done`` (its files' sizes
and sha256) in the checkpoint's temp directory ``step-N.tmp-<token>``. The token is new for every
persisted checkpoint (rank 0 draws it, one all-reduce hands it to every rank), so parts of an
interrupted attempt are never mixed with a later one's.

Who seals. Rank 0's agent, once every rank's done-mark is there: marks removed, the manifest
(sizes and the writers' checksums) written last, the atomic rename to ``step-N`` and the pruning to
``checkpoint.keep`` (``sync.seal``), then other ranks' abandoned temp directories removed. A rank
whose part cannot be written leaves ``.rank<r>.failed`` (its agent, or its trainer when the agent
is gone) and rank 0's agent gives up at once; a rank that never answers is given up after
``PART_TIMEOUT_S``. Until the rename nothing is named ``step-N``: a crash of any agent (or all)
leaves the previous checkpoints untouched and the newest complete one loadable.

The agent runs one persist at a time (``Persister``); the trainer waits for it only when it must
(``snapshot.py``): before it asks for the next one, at the last step and on SIGTERM, and before it
writes a new snapshot into the slot the agent is still reading (``hold``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .flat import unflatten
from .slots import Slot, Snapshot
from .sync import file_checksum, fsync_path, seal, step_dir

# file -> the rank whose agent writes it (mod the number of ranks); the parameters and the
# optimizer state (twice their bytes with Adam) on two ranks' agents, written in parallel
PARTS = {"model.safetensors": 0, "trainer_state.json": 0, "optimizer.pt": 1}
PART_TIMEOUT_S = 600.0
_TOKEN = re.compile(r"[0-9a-f]+")
_AGENT_TMP = re.compile(r"step-\d+\.tmp-[0-9a-f]+")


class PersistError(RuntimeError):
    pass


def part_files(rank: int, world: int) -> list[str]:
    return [name for name, owner in PARTS.items() if owner % world == rank]


def tmp_dir(root: Path, step: int, token: str) -> Path:
    return root / f"step-{step:06d}.tmp-{token}"


def _mark(tmp: Path, rank: int, kind: str) -> Path:
    return tmp / f".rank{rank}.{kind}"


def _write_durably(path: Path, text: str) -> None:
    """``path`` with ``text``, appearing whole or not at all (temp file, fsync, rename)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    fsync_path(new)
    new.rename(path)
    fsync_path(path.parent)


def mark_failed(tmp: Path, rank: int, why: str) -> None:
    """Tell the sealing agent that ``rank``'s part of this checkpoint will not come."""
    with contextlib.suppress(OSError):  # no directory to mark: nothing will be sealed anyway
        tmp.mkdir(parents=True, exist_ok=True)
        _write_durably(_mark(tmp, rank, "failed"), why)


def tied_names(model_state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{dropped name: kept name} of parameters that are the same tensor (tied embeddings), by
    safetensors' ``save_model`` rule (the first name in sorted order is kept): the synchronous
    checkpointer stores them once, and so do the agents, whose slot holds each name's own copy."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, t in model_state.items():
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel() * t.element_size())
            groups.setdefault(key, []).append(name)
    tied = {}
    for names in groups.values():
        kept, *dropped = sorted(names)
        tied.update(dict.fromkeys(dropped, kept))
    return tied


def write_part(snap: Snapshot, tmp: Path, rank: int, world: int) -> dict[str, tuple[int, str]]:
    """Write ``rank``'s files of the checkpoint of snapshot ``snap`` into ``tmp``, each fsynced,
    then its done-mark; returns {file: (size, checksum)}."""
    tmp.mkdir(parents=True, exist_ok=True)
    meta = snap.meta
    full = unflatten(meta["tree"], snap.tensors)
    written: dict[str, tuple[int, str]] = {}
    for name in part_files(rank, world):
        path = tmp / name
        if name == "model.safetensors":
            tied = meta.get("tied", {})
            model = {k: v for k, v in full["model"].items() if k not in tied}
            save_file(model, str(path), metadata=tied or None)
        elif name == "optimizer.pt":
            torch.save({"optimizer": full["optimizer"], "scheduler": full["scheduler"]}, path)
        else:
            state = {
                "step": snap.step,
                "data": full["data"],
                "rng_cpu": full["rng"]["torch"].tolist(),
                "model_config": meta["model_config"],
            }
            path.write_text(json.dumps(state))
        fsync_path(path)
        written[name] = (path.stat().st_size, file_checksum(path))
    _write_durably(_mark(tmp, rank, "done"), json.dumps(written))
    return written


def wait_parts(tmp: Path, world: int, timeout: float, poll: float = 0.02) -> dict[str, tuple[int, str]]:
    """Every rank's {file: (size, checksum)} once all done-marks are in ``tmp``; ``PersistError``
    when a rank marked its part failed or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        known: dict[str, tuple[int, str]] = {}
        missing = []
        for r in range(world):
            failed = _mark(tmp, r, "failed")
            if failed.is_file():
                raise PersistError(f"rank {r} could not write its part: {failed.read_text()}")
            try:
                known.update(
                    {k: (v[0], v[1]) for k, v in json.loads(_mark(tmp, r, "done").read_text()).items()}
                )
            except FileNotFoundError:
                missing.append(r)
        if not missing:
            return known
        if time.monotonic() > deadline:
            raise PersistError(f"ranks {missing} did not write their parts within {timeout:.0f} s")
        time.sleep(poll)


def seal_parts(root: Path, tmp: Path, step: int, world: int, keep: int, timeout: float) -> Path:
    """Rank 0's agent: once every part is written, seal ``tmp`` as ``step-N`` (manifest last,
    rename, prune) and remove the temp directories of abandoned attempts."""
    known = wait_parts(tmp, world, timeout)
    for mark in tmp.glob(".rank*"):
        mark.unlink()
    final = step_dir(root, step)
    seal(root, tmp, final, step, keep, known)
    for other in root.iterdir():  # one persist runs at a time: any other is abandoned
        if _AGENT_TMP.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)
    return final


def persist_slot(request: dict[str, Any], released: Callable[[], None]) -> str:
    """The agent's job: ``request['rank']``'s part of the checkpoint of the snapshot in slot
    ``request['slot']`` (which must hold step ``request['step']``), and on the sealing rank the
    seal. ``released()`` once the slot's bytes are no longer read. Returns the checkpoint's path
    (the temp directory on a rank that does not seal)."""
    root, step, rank, world = (
        Path(request["root"]),
        int(request["step"]),
        int(request["rank"]),
        int(request["world"]),
    )
    if not _TOKEN.fullmatch(request["token"]):
        raise PersistError(f"a persist token must be hex digits, got {request['token']!r}")
    tmp = tmp_dir(root, step, request["token"])
    slot = Slot(Path(request["slot"]))
    snap: Snapshot | str | None = None
    try:
        snap = slot.view()
        if isinstance(snap, str) or snap.step != step:
            held = snap if isinstance(snap, str) else f"it holds step {snap.step}"
            raise PersistError(f"slot {slot.path.name} cannot be persisted as step {step}: {held}")
        write_part(snap, tmp, rank, world)
    except BaseException as e:
        mark_failed(tmp, rank, f"{type(e).__name__}: {e}")
        raise
    finally:
        snap = None  # the views of the mapping go before it is closed
        gc.collect()
        with contextlib.suppress(BufferError):  # views still held by a traceback: freed with it
            slot.close()
        released()
    if not request["seal"]:
        return str(tmp)
    return str(seal_parts(root, tmp, step, world, int(request["keep"]), float(request["timeout"])))


class Persister:
    """An agent's persist jobs, one at a time, each on a thread of its own (the agent keeps
    answering requests meanwhile). ``start`` waits for the previous job; ``result`` waits for the
    current one; ``hold`` waits until no job reads a given slot."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.reading: str | None = None  # the slot file the running job reads
        self.outcome: dict[str, Any] = {"step": None}

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        self.join()
        with self.cond:
            self.reading = request["slot"]
            self.outcome = {"step": request["step"], "running": True}
        self.thread = threading.Thread(
            target=self._run, args=(request,), name="longtrain-persist", daemon=True
        )
        self.thread.start()
        return {"started": request["step"]}

    def _run(self, request: dict[str, Any]) -> None:
        outcome: dict[str, Any] = {"step": request["step"]}
        try:
            outcome["path"] = persist_slot(request, self._released)
        except BaseException as e:  # reported to the trainer that asks for the result
            outcome["failed"] = f"{type(e).__name__}: {e}"
        with self.cond:
            self.outcome = outcome
            self.reading = None
            self.cond.notify_all()

    def _released(self) -> None:
        with self.cond:
            self.reading = None
            self.cond.notify_all()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def result(self) -> dict[str, Any]:
        """The last job's outcome once it is done: {step, path} or {step, failed}; {step: None}
        when this agent has persisted nothing."""
        self.join()
        with self.cond:
            return dict(self.outcome)

    def hold(self, slot: str) -> dict[str, Any]:
        with self.cond:
            self.cond.wait_for(lambda: self.reading != slot)
        return {"held": slot}

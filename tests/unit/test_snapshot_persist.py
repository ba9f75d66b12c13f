"""Persistence by the agents (checkpoint/persist.py), in one process: the parts of a checkpoint
written from a slot by each rank and sealed by rank 0 make the files the synchronous checkpointer
writes; a rank that cannot write its part stops the seal at once; tied parameters are stored once,
by safetensors' own rule."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_model
from tiny import tiny_snapshot
from torch import nn

from longtrain.checkpoint import is_complete, list_steps, newest_verified, verify
from longtrain.checkpoint.flat import unflatten
from longtrain.checkpoint.persist import (
    Persister,
    PersistError,
    mark_failed,
    part_files,
    persist_slot,
    seal_parts,
    tmp_dir,
    write_part,
)
from longtrain.checkpoint.slots import Slot, create_slot_file, required_bytes


def slot_with(path, step: int, tensors, meta) -> Slot:
    create_slot_file(path, required_bytes(tensors, meta))
    slot = Slot(path)
    slot.write(1, step, tensors, meta)
    return slot


def test_tied_parameters_are_stored_once_as_save_model_stores_them(tmp_path):
    tensors, meta = tiny_snapshot(5)
    assert meta["tied"] == {"2.weight": "0.weight"}
    slot = slot_with(tmp_path / "slot", 5, tensors, meta)
    snap = slot.view()
    assert not isinstance(snap, str)
    write_part(snap, tmp_path / "tmp", 0, 1)
    del snap
    slot.close()
    model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    model[2].weight = model[0].weight
    model.load_state_dict(unflatten(meta["tree"], tensors)["model"])
    save_model(model, str(tmp_path / "reference.safetensors"))
    assert (tmp_path / "tmp" / "model.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    written = json.loads((tmp_path / "tmp" / "trainer_state.json").read_text())
    assert written["step"] == 5 and written["data"] == {"position": 5, "epoch": [0, 1]}
    assert written["model_config"] == {"hidden": 8}


def test_parts_of_two_ranks_sealed_by_rank_0_equal_one_rank_writing_all(tmp_path):
    tensors, meta = tiny_snapshot(4)
    assert part_files(0, 2) == ["model.safetensors", "trainer_state.json"] and part_files(1, 2) == [
        "optimizer.pt"
    ]
    slot = slot_with(tmp_path / "slot", 4, tensors, meta)
    roots = {}
    for world in (1, 2):
        root = tmp_path / f"world{world}"
        for rank in reversed(range(world)):  # rank 1's agent may well be done first
            job = {"root": str(root), "step": 4, "token": "ab12", "rank": rank, "world": world, "keep": 2,
                   "seal": rank == 0, "timeout": 5.0, "slot": str(slot.path)}  # fmt: skip
            released: list[bool] = []
            path = persist_slot(job, functools.partial(released.append, True))
            assert released == [True]
        assert path == str(root / "step-000004") and is_complete(root / "step-000004")
        verify(root / "step-000004")
        roots[world] = root / "step-000004"
    slot.close()
    one, two = roots[1], roots[2]
    assert sorted(p.name for p in two.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    ]  # no done-marks left
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    opt = torch.load(two / "optimizer.pt", weights_only=True)
    assert opt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    reference = load_file(str(one / "model.safetensors"))
    assert torch.equal(reference["0.weight"], tensors["/model/0.weight"])


def test_a_rank_that_cannot_write_its_part_stops_the_seal_and_nothing_looks_complete(tmp_path):
    tensors, meta = tiny_snapshot(6)
    slot = slot_with(tmp_path / "slot", 6, tensors, meta)
    snap = slot.view()
    assert not isinstance(snap, str)
    root = tmp_path / "checkpoints"
    tmp = tmp_dir(root, 6, "cd34")
    write_part(snap, tmp, 0, 2)
    del snap
    slot.close()
    with pytest.raises(PersistError, match=r"ranks \[1\] did not write their parts within 0 s"):
        seal_parts(root, tmp, 6, 2, keep=2, timeout=0.0)
    mark_failed(tmp, 1, "OSError: No space left on device")
    with pytest.raises(
        PersistError, match="rank 1 could not write its part: OSError: No space left on device"
    ):
        seal_parts(root, tmp, 6, 2, keep=2, timeout=60.0)  # at once, not after the timeout
    assert list_steps(root) == [] and newest_verified(root) is None


def test_a_slot_that_does_not_hold_the_step_is_not_persisted(tmp_path):
    tensors, meta = tiny_snapshot(2)
    slot = slot_with(tmp_path / "slot", 2, tensors, meta)
    slot.close()
    root = tmp_path / "checkpoints"
    job = {"root": str(root), "step": 3, "token": "ef56", "rank": 0, "world": 1, "keep": 2, "seal": True,
           "timeout": 5.0, "slot": str(tmp_path / "slot")}  # fmt: skip
    with pytest.raises(PersistError, match="slot slot cannot be persisted as step 3: it holds step 2"):
        persist_slot(job, lambda: None)
    assert (tmp_dir(root, 3, "ef56") / ".rank0.failed").is_file() and list_steps(root) == []


def test_hold_waits_while_the_agent_reads_the_slot_and_only_that_slot(tmp_path, monkeypatch):
    import longtrain.checkpoint.persist as persist

    tensors, meta = tiny_snapshot(8)
    slot = slot_with(tmp_path / "slot0", 8, tensors, meta)
    slot.close()
    gate = threading.Event()
    real_write_part = persist.write_part

    def slow_write_part(*args):
        assert gate.wait(10)
        return real_write_part(*args)

    monkeypatch.setattr(persist, "write_part", slow_write_part)
    persister = Persister()
    root = tmp_path / "checkpoints"
    job = {"root": str(root), "step": 8, "token": "0a", "rank": 0, "world": 1, "keep": 2, "seal": True,
           "timeout": 5.0, "slot": str(slot.path)}  # fmt: skip
    assert persister.start(job) == {"started": 8}
    assert persister.hold(str(tmp_path / "slot1")) == {"held": str(tmp_path / "slot1")}  # not read: at once
    held = threading.Event()
    threading.Thread(target=lambda: (persister.hold(str(slot.path)), held.set()), daemon=True).start()
    assert not held.wait(0.3)  # the agent still reads slot0: a writer must wait
    gate.set()
    assert held.wait(10)
    assert persister.result() == {"step": 8, "path": str(root / "step-000008")}
    verify(root / "step-000008")

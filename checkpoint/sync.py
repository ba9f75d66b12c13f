"""Simple synchronous checkpoints: save every K steps, resume from the newest complete one.

Layout (one directory per step, parameters stored per tensor under their HF names, so the
format does not depend on the number of ranks):

    <dir>/step-000050/model.safetensors     parameters
    <dir>/step-000050/optimizer.pt          optimizer + scheduler state
    <dir>/step-000050/trainer_state.json    step, data-loader position, RNG, model config
    <dir>/step-000050/manifest.json         written last: file sizes; its presence marks "complete"

A checkpoint is written into ``step-N.tmp``, every file fsynced, then renamed, so a crash never
leaves a half-written ``step-N``. The lazy asynchronous in-memory snapshots of the checkpoint
package replace the save path; the on-disk format and ``list_complete`` stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from longtrain.config_checks import ConfigError

from .config import CheckpointConfig

MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message names it and what to change."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size == size for name, size in sizes.items()
    )


_STEP_DIR = re.compile(r"step-(\d+)")


def _step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    assert match is not None  # only called on step-N directories
    return int(match.group(1))


def list_complete(root: Path) -> list[Path]:
    """Complete ``step-N`` directories, oldest first (``step-N.tmp``, ``step-N.old``... are ignored)."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and is_complete(p)]
    return sorted(steps, key=_step_of)


@dataclass
class Restored:
    step: int
    data_state: dict[str, Any]
    path: Path


class SyncCheckpointer:
    """Saves on rank 0 (data-parallel replicas hold identical states); every rank loads."""

    def __init__(self, cfg: CheckpointConfig, output_dir: str, is_main: bool, model_config: dict[str, Any]):
        """``model_config``: the architecture (HF config fields) a checkpoint must match to be loaded."""
        self.cfg = cfg
        self.root = Path(cfg.dir or Path(output_dir) / "checkpoints")
        self.is_main = is_main
        self.model_config = model_config

    def should_save(self, step: int, total_steps: int) -> bool:
        return self.cfg.enabled and (step % self.cfg.every == 0 or step == total_steps)

    def save(
        self, step: int, model: nn.Module, optimizer, scheduler, data_state: dict[str, Any]
    ) -> Path | None:
        final = _step_dir(self.root, step)
        if not self.is_main:
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
        )
        state = {
            "step": step,
            "data": data_state,
            "rng_cpu": torch.get_rng_state().tolist(),
            "model_config": self.model_config,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        for name in files:
            _fsync(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
        _fsync(tmp / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync(self.root)  # make the rename itself durable
        self._prune()
        return final

    def _prune(self) -> None:
        if self.cfg.keep > 0:
            for old in list_complete(self.root)[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def find_resume(self) -> Path | None:
        """auto: newest complete checkpoint under the directory (None if none); never: None; else a path."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            found = list_complete(self.root)
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint.resume={self.cfg.resume!r} is not a directory; use auto, never or a step-N directory"
            )
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={self.cfg.resume!r} is incomplete (no valid {MANIFEST}); pick another step-N"
            )
        return path

    def load(self, path: Path, model: nn.Module, optimizer, scheduler) -> Restored:
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("model_config") != self.model_config:
            changed = sorted(
                k
                for k in set(state.get("model_config", {})) | set(self.model_config)
                if state.get("model_config", {}).get(k) != self.model_config.get(k)
            )
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for a different model (model.{', model.'.join(changed)} differ); "
                "use a new output_dir or checkpoint.resume=never"
            )
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "use a new output_dir or checkpoint.resume=never"
            )
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
        return Restored(step=state["step"], data_state=state["data"], path=path)

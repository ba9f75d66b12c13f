"""Simple synchronous checkpoints: save every K steps, resume from the newest complete one.

Layout (one directory per step, parameters stored per tensor under their HF names, so the
format does not depend on the number of ranks):

    <dir>/step-000050/model.safetensors     parameters
    <dir>/step-000050/optimizer.pt          optimizer + scheduler state
    <dir>/step-000050/trainer_state.json    step, data-loader position, RNG, model config
    <dir>/step-000050/manifest.json         written last: file sizes and sha256 checksums;
                                            its presence marks "complete"

A checkpoint is written into ``step-N.tmp``, every file fsynced, then renamed, so a crash never
leaves a half-written ``step-N``. A checkpoint damaged later (a truncated copy, a bad disk) fails
``verify``: resuming skips it with a warning naming it and why, or refuses it when it was asked
for by name. Manifests written before checksums existed have sizes only; they are accepted on
the size check (refusing them would strand the checkpoints of every earlier run).

Readers go through ``find_checkpoint`` (or ``verify``) and ``load_weights``, the functions a later
checkpoint format changes (the lazy asynchronous in-memory snapshots of the checkpoint package replace the save
path).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from longtrain.config_checks import ConfigError

from .config import CheckpointConfig
from .protocol import Restored, TrainState

if TYPE_CHECKING:
    from longtrain.parallel import Mesh

MANIFEST = "manifest.json"
# sha256: anyone can check a file by hand (`sha256sum`), and hashlib (OpenSSL, SHA CPU instructions)
# hashes ~1 GiB/s on one core, about a fast disk's write rate. zlib's crc32 measured 2x faster but
# has no standard command-line check and only 32 bits.
CHECKSUM = "sha256"
_HASH_CHUNK = 8 * 2**20


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message names it and what to change."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


_step_dir = step_dir  # the name parallel/zero3.py imports


def file_checksum(path: Path) -> str:
    digest = hashlib.new(CHECKSUM)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _size_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    for name, size in manifest["files"].items():
        if not (path / name).is_file():
            return f"{name} is missing"
        actual = (path / name).stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes where its manifest says {size} (truncated or overwritten)"
    return None


def is_complete(path: Path) -> bool:
    """Manifest present and every file of the size it lists (cheap: no checksums)."""
    manifest = _read_manifest(path)
    return manifest is not None and _size_problem(path, manifest) is None


def verify(path: Path) -> None:
    """Raise ``CheckpointError`` saying what is wrong with checkpoint ``path``: no readable manifest,
    a missing file, a size or a checksum that differs from the manifest's."""
    manifest = _read_manifest(path)
    problem = f"it has no readable {MANIFEST} (an interrupted save?)" if manifest is None else None
    if manifest is not None:
        problem = _size_problem(path, manifest)
    if manifest is not None and problem is None:
        for name, expected in manifest.get(CHECKSUM, {}).items():  # absent in older manifests
            if file_checksum(path / name) != expected:
                problem = f"{name} does not match its {CHECKSUM} in {MANIFEST} (corrupt)"
                break
    if problem is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is unusable: {problem}")


_STEP_DIR = re.compile(r"step-(\d+)")


def step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    assert match is not None  # only called on step-N directories
    return int(match.group(1))


def list_steps(root: Path) -> list[Path]:
    """``step-N`` directories, complete or not, oldest first (``step-N.tmp``, ``step-N.old``... are ignored)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)), key=step_of)


def list_complete(root: Path) -> list[Path]:
    """Complete ``step-N`` directories (``is_complete``), oldest first."""
    return [p for p in list_steps(root) if is_complete(p)]


def newest_verified(root: Path, warn: bool = True) -> Path | None:
    """The newest ``step-N`` under ``root`` that passes ``verify``; each newer one that fails is
    skipped with a warning on stderr (``warn``) saying which and why."""
    for path in reversed(list_steps(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            if warn:
                print(f"longtrain: warning: skipping {e}", file=sys.stderr, flush=True)
    return None


def find_checkpoint(root: Path, step: int | None = None) -> Path:
    """Checkpoint ``step`` under ``root``, or the newest that verifies (``newest_verified``, which
    warns about the newer ones it skips); ``CheckpointError`` when there is none or it fails ``verify``."""
    if step is None:
        found = newest_verified(root)
        if found is None:
            raise CheckpointError(
                f"no complete checkpoint under {str(root)!r} (training saves one every checkpoint.every "
                "steps and after the last when checkpoint.enabled=true)"
            )
        return found
    path = step_dir(root, step)
    if not path.is_dir():
        steps = ", ".join(str(step_of(p)) for p in list_complete(root)) or "none"
        raise CheckpointError(
            f"no checkpoint of step {step} under {str(root)!r} (complete steps there: {steps})"
        )
    verify(path)
    return path


def seal(
    root: Path, tmp: Path, final: Path, step: int, keep: int, known: dict[str, tuple[int, str]] | None = None
) -> None:
    """Make the written directory ``tmp`` checkpoint ``final``: every file under it (subdirectories
    included) fsynced and listed with its size and checksum in the manifest, written last, then
    an atomic rename and the pruning of old checkpoints to the newest ``keep`` (0: all).
    ``known``: files already fsynced and hashed by their writer (name -> size, checksum: the
    agents' parts, ``persist.py``); their size is checked again here, their bytes are not re-read."""
    known = known or {}
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    checksums = {}
    for name, size in files.items():
        if name in known:
            if known[name][0] != size:
                raise CheckpointError(
                    f"{tmp / name} has {size} bytes where its writer reported {known[name][0]}; not sealing step {step}"
                )
            checksums[name] = known[name][1]
        else:
            fsync_path(tmp / name)
            checksums[name] = file_checksum(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, CHECKSUM: checksums}))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)  # the directory's entries, before it becomes visible under its final name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_path(root)  # make the rename itself durable
    prune(root, keep)


def prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (checkpoint.keep; 0 keeps all)."""
    if keep > 0:
        for old in list_complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


RESUME_HINT = "use a new output_dir or checkpoint.resume=never"


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (tied weights copied): what
    safetensors' ``save_file`` writes."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def load_weights(
    path: Path, model: nn.Module, model_config: dict[str, Any], hint: str = RESUME_HINT, sharded: bool = False
) -> None:
    """Load the parameters of checkpoint ``path`` (HF names; tied weights stored once) into
    ``model``, whose architecture ``model_config`` must be the one the checkpoint was written for.
    ``sharded``: ``model`` is FSDP-sharded; every rank reads the full file and keeps its shards."""
    saved = json.loads((path / "trainer_state.json").read_text()).get("model_config", {})
    if saved != model_config:
        changed = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for a different model (model.{', model.'.join(changed)} differ); "
            f"{hint}"
        )
    if sharded:
        from longtrain.parallel.fsdp import load_full_model_state

        state = load_file(str(path / "model.safetensors"))
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if not missing and not unexpected:
            load_full_model_state(model, state)
    else:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"{hint}"
        )


class SyncCheckpointer:
    """A ``Checkpointer`` that writes to disk before ``save`` returns. Saves on rank 0 (data-parallel
    replicas hold identical states); every rank loads.

    Sharded states (``parallel.shard=fsdp``): every rank takes part in gathering the full model and
    optimizer states (collectives), rank 0 writes them in the same per-parameter format, so a
    checkpoint resumes on any number of ranks, sharded or not."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        output_dir: str,
        mesh: Mesh,
        model_config: dict[str, Any],
        sharded: bool = False,
    ):
        """``model_config``: the architecture (HF config fields) a checkpoint must match to be loaded."""
        self.cfg = cfg
        self.root = Path(cfg.dir or Path(output_dir) / "checkpoints")
        self.mesh = mesh
        self.is_main = mesh.is_main
        self.model_config = model_config
        self.sharded = sharded
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote

    def should_save(self, step: int, total_steps: int) -> bool:
        return self.cfg.enabled and (step % self.cfg.every == 0 or step == total_steps)

    def save(self, step: int, state: TrainState) -> None:
        self.write(step, state.model, state.optimizer, state.scheduler, state.data.state_dict())
        if self.mesh.distributed:  # no rank runs ahead (and may crash) before rank 0's save is complete
            torch.distributed.barrier()
        self.saved_step = step

    def persist(self, step: int, state: TrainState) -> Path | None:
        if not self.cfg.enabled:
            return None
        if self.saved_step != step:
            self.save(step, state)
        return step_dir(self.root, step)

    def wait(self) -> None:
        """Nothing to wait for: ``save`` returns after the files are written."""

    def load(self, state: TrainState) -> Restored | None:
        path = self.agreed_resume()
        return None if path is None else self.load_from(path, state)

    def agreed_resume(self) -> Path | None:
        """``find_resume`` on rank 0 (only it writes checkpoints), the same path on every rank."""
        from longtrain.parallel import broadcast_object

        return broadcast_object(self.find_resume() if self.is_main else None, self.mesh)

    def load_from(self, path: Path, state: TrainState) -> Restored:
        """Restore checkpoint ``path`` (every rank: every rank must see the same directory)."""
        if not (path / MANIFEST).is_file():
            raise CheckpointError(
                f"rank {self.mesh.rank} cannot read checkpoint {str(path)!r} that rank 0 resumes from; "
                "put checkpoint.dir on a filesystem shared by all ranks"
            )
        restored = self.read(path, state.model, state.optimizer, state.scheduler)
        state.data.load_state_dict(restored.data_state)
        return restored

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Nothing to release: no threads, no processes."""

    def write(
        self, step: int, model: nn.Module, optimizer, scheduler, data_state: dict[str, Any]
    ) -> Path | None:
        """Write checkpoint ``step`` (rank 0; the other ranks only join the gathering of a
        sharded state); returns its directory."""
        final = step_dir(self.root, step)
        model_state = optimizer_state = None
        if self.sharded:  # collectives: every rank gathers, rank 0 writes
            from longtrain.parallel.fsdp import full_model_state

            model_state = full_model_state(model)
            optimizer_state = optimizer.state_dict()
        if not self.is_main:
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if model_state is not None:
            save_file(_unshared(model_state), str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            tmp / "optimizer.pt",
        )
        state = {
            "step": step,
            "data": data_state,
            "rng_cpu": torch.get_rng_state().tolist(),
            "model_config": self.model_config,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        self.seal(tmp, final, step)
        return final

    def seal(self, tmp: Path, final: Path, step: int) -> None:
        """Make the written directory ``tmp`` checkpoint ``final`` (``seal``), pruning to checkpoint.keep."""
        seal(self.root, tmp, final, step, self.cfg.keep)

    def find_resume(self) -> Path | None:
        """auto: newest verified checkpoint under the directory (None if none), saying which newer
        ones it skipped and why; never: None; else that directory, which must verify."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return newest_verified(self.root, warn=self.is_main)
        path = Path(self.cfg.resume)
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint.resume={self.cfg.resume!r} is not a directory; use auto, never or a step-N directory"
            )
        try:
            verify(path)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint.resume: {e}; pick another step-N or auto") from None
        return path

    def read(self, path: Path, model: nn.Module, optimizer, scheduler) -> Restored:
        state = json.loads((path / "trainer_state.json").read_text())
        if "deepspeed_world_size" in state:  # parallel/zero3.py EngineCheckpointer
            world = state["deepspeed_world_size"]
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds DeepSpeed optimizer partitions (written by parallel.shard=deepspeed "
                f"on {world} ranks): resume it with parallel.shard=deepspeed --nproc {world}, or use a new "
                "output_dir or checkpoint.resume=never"
            )
        load_weights(path, model, self.model_config, sharded=self.sharded)
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
        return Restored(step=state["step"], data_state=state["data"], path=path)

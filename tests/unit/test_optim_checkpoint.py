"""Learning-rate schedule, parameter groups and the synchronous checkpointer (save, prune, resume)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch

from longtrain.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    SyncCheckpointer,
    TrainState,
    is_complete,
    list_complete,
)
from longtrain.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor
from longtrain.optim.build import param_groups
from longtrain.parallel import Mesh
from longtrain.trainer.model.adapter import adapt

# --- schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        # linear warm-up over 10 steps: step k (0-based) runs at (k + 1) / 10
        ("cosine", 0, 0.1),
        ("cosine", 4, 0.5),
        ("cosine", 9, 1.0),
        # decay over the remaining 90 steps to min_lr_ratio = 0.1
        ("cosine", 10, 1.0),
        ("cosine", 28, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2))),
        ("cosine", 55, 0.55),
        ("cosine", 100, 0.1),
        ("cosine", 150, 0.1),  # clamped after the end
        ("linear", 28, 0.1 + 0.9 * 0.8),
        ("linear", 55, 0.55),
        ("linear", 100, 0.1),
        ("constant", 4, 0.5),
        ("constant", 60, 1.0),
    ],
)
def test_lr_factor_known_values(schedule, step, expected):
    cfg = OptimConfig(warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert lr_factor(step, 100, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_factor_without_warmup_starts_at_peak():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, 10, cfg) == 1.0
    assert lr_factor(5, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.0, abs=1e-15)


def test_scheduler_applies_lr_factor_per_step():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=2.0, warmup_steps=3, min_lr_ratio=0.25)
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=8)
    for step in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(step, 8, cfg), rel=1e-12)
        opt.step()
        sched.step()


def test_param_groups_decay_only_matrices(make_tiny_model):
    model = adapt(make_tiny_model("qwen2"))
    decay, no_decay = param_groups(list(model.parameters()), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("q_proj.bias") for p in no_decay["params"])
    assert any(names[id(p)].endswith("input_layernorm.weight") for p in no_decay["params"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_build_optimizer(make_tiny_model, name):
    """optim.name picks the algorithm and its hyperparameters reach it: two steps of the container
    (state beside the parameters, no clipping) equal torch's AdamW / SGD over the same parameter
    groups, bit for bit."""
    model, ref_model = adapt(make_tiny_model("llama")), adapt(make_tiny_model("llama"))
    cfg = OptimConfig(name=name, lr=0.01, betas=[0.8, 0.9], grad_clip=0.0)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Optimizer)  # what LambdaLR needs
    if name == "adamw":
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    groups = param_groups(list(ref_model.parameters()), cfg.weight_decay)
    ref = (
        torch.optim.AdamW(groups, lr=0.01, betas=(0.8, 0.9), eps=cfg.eps)
        if name == "adamw"
        else torch.optim.SGD(groups, lr=0.01, momentum=cfg.momentum)
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for m, o in ((model, opt), (ref_model, ref)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    opt.close()


# --- checkpoints -------------------------------------------------------------------------------

MODEL_CONFIG = {"family": "llama", "hidden_size": 32}


def trained_state(make_tiny_model, seed: int = 0, steps: int = 3):
    """A tiny adapted model, AdamW with state and a scheduler that has stepped ``steps`` times."""
    model = adapt(make_tiny_model("llama", seed=seed), "cpu_flash")
    cfg = OptimConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


ONE_PROCESS = Mesh(rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))


def checkpointer(tmp_path, model_config=MODEL_CONFIG, **kwargs) -> SyncCheckpointer:
    return SyncCheckpointer(CheckpointConfig(**kwargs), str(tmp_path), ONE_PROCESS, dict(model_config))


def assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


def test_save_load_round_trip(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, seed=0)
    data_state = {"consumed_microbatches": 7, "epoch": 1, "seed": 0}
    ckpt = checkpointer(tmp_path)
    torch.manual_seed(1234)
    path = ckpt.write(3, model, opt, sched, data_state)
    rng_after_save = torch.rand(4)

    assert path == tmp_path / "checkpoints" / "step-000003"
    assert is_complete(path) and list_complete(ckpt.root) == [path]
    assert ckpt.find_resume() == path

    # a different model (other seed) with other optimizer state, then load
    model2, opt2, sched2 = trained_state(make_tiny_model, seed=1, steps=1)
    assert not torch.equal(model2.lm_head.weight, model.lm_head.weight)
    torch.manual_seed(999)
    restored = ckpt.read(path, model2, opt2, sched2)

    assert restored.step == 3 and restored.data_state == data_state and restored.path == path
    for (n, p), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(4), rng_after_save)  # CPU RNG restored


def test_training_continues_identically_after_load(tmp_path, make_tiny_model):
    """One more step from the restored state equals one more step of the original (bit-exact)."""
    model, opt, sched = trained_state(make_tiny_model, seed=0)
    ckpt = checkpointer(tmp_path)
    path = ckpt.write(3, model, opt, sched, {})
    model2, opt2, sched2 = trained_state(make_tiny_model, seed=1, steps=1)
    ckpt.read(path, model2, opt2, sched2)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
        s.step()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


class DataPosition:
    """A loader's position, as the loop hands it over: state_dict / load_state_dict only."""

    def __init__(self, consumed: int) -> None:
        self.consumed = consumed

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = state["consumed"]


def test_protocol_save_then_load_restores_the_whole_state(tmp_path, make_tiny_model):
    """Through the ``Checkpointer`` protocol alone (what the loop uses): a fresh directory resumes
    nothing; after save, load restores parameters, optimizer, scheduler and data position."""
    model, opt, sched = trained_state(make_tiny_model, seed=0)
    ckpt: Checkpointer = checkpointer(tmp_path)
    model2, opt2, sched2 = trained_state(make_tiny_model, seed=1, steps=1)
    target = TrainState(model2, opt2, sched2, DataPosition(0))
    assert ckpt.load(target) is None

    assert ckpt.should_save(3, 3)
    ckpt.save(3, TrainState(model, opt, sched, DataPosition(42)))
    ckpt.wait()
    restored = ckpt.load(target)
    ckpt.close()

    assert restored is not None and restored.step == 3 and target.data.consumed == 42
    assert_state_equal(model.state_dict(), model2.state_dict())
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict() == sched.state_dict()


def test_keep_prunes_old_checkpoints(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    ckpt = checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.write(step, model, opt, sched, {"step": step})
    names = sorted(p.name for p in ckpt.root.iterdir())
    assert names == ["step-000003", "step-000004"]
    assert [p.name for p in list_complete(ckpt.root)] == names


def test_keep_zero_keeps_all(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    ckpt = checkpointer(tmp_path, keep=0)
    for step in (1, 2, 3):
        ckpt.write(step, model, opt, sched, {})
    assert len(list_complete(ckpt.root)) == 3


def test_incomplete_checkpoints_are_ignored(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    ckpt = checkpointer(tmp_path, keep=0)
    good = ckpt.write(2, model, opt, sched, {})
    # a crash during save leaves step-N.tmp (here even with a manifest); a step dir without one
    shutil.copytree(good, ckpt.root / "step-000009.tmp")
    no_manifest = ckpt.root / "step-000008"
    shutil.copytree(good, no_manifest)
    (no_manifest / "manifest.json").unlink()
    # a truncated file: the manifest's size no longer matches
    truncated = ckpt.root / "step-000007"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    # a corrupt manifest
    corrupt = ckpt.root / "step-000006"
    shutil.copytree(good, corrupt)
    (corrupt / "manifest.json").write_text("{not json")

    assert is_complete(good)
    for bad in (no_manifest, truncated, corrupt):
        assert not is_complete(bad), bad.name
    assert list_complete(ckpt.root) == [good]
    assert ckpt.find_resume() == good
    # pointing resume at an incomplete one is a user error naming the key
    with pytest.raises(CheckpointError, match="checkpoint.resume"):
        checkpointer(tmp_path, resume=str(truncated)).find_resume()
    with pytest.raises(CheckpointError, match="checkpoint.resume"):
        checkpointer(tmp_path, resume=str(tmp_path / "nope")).find_resume()
    assert checkpointer(tmp_path, resume=str(good)).find_resume() == good
    assert checkpointer(tmp_path, resume="never").find_resume() is None


def test_no_checkpoint_dir_means_no_resume(tmp_path):
    assert checkpointer(tmp_path).find_resume() is None
    assert list_complete(tmp_path / "missing") == []


def test_resume_with_a_different_model_config_raises(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    path = checkpointer(tmp_path).write(1, model, opt, sched, {})
    other = checkpointer(tmp_path, model_config={"family": "llama", "hidden_size": 64})
    with pytest.raises(CheckpointError, match=r"model\.hidden_size") as err:
        other.read(path, model, opt, sched)
    assert "\n" not in str(err.value)


def test_manifest_lists_every_file(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    path = checkpointer(tmp_path).write(5, model, opt, sched, {"a": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])


def test_disabled_checkpointing_never_saves(tmp_path):
    ckpt = checkpointer(tmp_path, enabled=False)
    assert not any(ckpt.should_save(s, 10) for s in range(1, 11))
    ckpt = checkpointer(tmp_path, every=4)
    assert [s for s in range(1, 11) if ckpt.should_save(s, 10)] == [4, 8, 10]


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_holds_the_sha256_of_every_file(tmp_path, make_tiny_model):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    path = checkpointer(tmp_path).write(5, model, opt, sched, {})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    for name, digest in manifest["sha256"].items():
        assert digest == hashlib.sha256((path / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "model.safetensors has"),  # the size no longer matches
        ("flip", "optimizer.pt does not match its sha256"),  # same size, other bytes
    ],
)
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(
    tmp_path, make_tiny_model, capsys, damage, reason
):
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    ckpt = checkpointer(tmp_path, keep=0)
    older = ckpt.write(2, model, opt, sched, {})
    newest = ckpt.write(3, model, opt, sched, {})
    if damage == "truncate":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        _flip_last_byte(newest / "optimizer.pt")
    capsys.readouterr()

    assert ckpt.find_resume() == older
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: warning: skipping"), err
    assert str(newest) in err[0] and reason in err[0]

    # asked for by name, the damaged checkpoint is a one-line error naming the key and the file
    with pytest.raises(CheckpointError, match="checkpoint.resume") as e:
        checkpointer(tmp_path, resume=str(newest)).find_resume()
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_manifest_without_checksums_is_accepted_on_its_sizes(tmp_path, make_tiny_model):
    """Checkpoints of earlier versions list sizes only: a size check still catches truncation."""
    model, opt, sched = trained_state(make_tiny_model, steps=1)
    ckpt = checkpointer(tmp_path, keep=0)
    older, newest = ckpt.write(2, model, opt, sched, {}), ckpt.write(3, model, opt, sched, {})
    for path in (older, newest):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["sha256"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.find_resume() == newest
    (newest / "optimizer.pt").write_bytes(b"")
    assert ckpt.find_resume() == older

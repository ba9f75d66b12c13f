"""The DeepSpeed ZeRO-3 engine (``parallel.shard=deepspeed``) against one unsharded process.

Oracle: ``longtrain train tiny_cpu`` in one process with micro-batches of 4, the same global batch
as 2 ranks with micro-batches of 2 (gradient accumulation 2, clipping on). ZeRO-3 reduces float32
gradients (no float64), so the losses must agree within 1e-5 relative (measured: ~3e-8), and the
gradient norms within 1e-4 (DeepSpeed sums the partitions' squared norms in another order). The
summed (not averaged) gradients are what the loss and the norms check: averaged gradients would halve
the norm at step 1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from longtrain.optim.cpu_adam import _deepspeed_op_built

pytestmark = pytest.mark.distributed

COMMON = [
    "train.seq_len=128",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "checkpoint.enabled=false",
    "logging.progress=false",
    "logging.peak_flops=1e12",
]
TOKENWISE_TILES = [
    "activation.mode=tokenwise",
    "activation.alpha=0.37",
    "activation.keep_last=1",
    "activation.tile_rows=16",
]


def train(cmd: list[str], out: Path, *extra: str, steps: int = 3) -> list[dict]:
    proc = subprocess.run(
        [*cmd, "train", "tiny_cpu", *extra, *COMMON, f"train.steps={steps}", f"output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "activation, offload",
    [(["activation.mode=none"], []), (TOKENWISE_TILES, ["optim.offload=dram"])],
    ids=["none, no offload", "tokenwise alpha 0.37 tiles, cpu offload"],
)
def test_deepspeed_two_ranks_log_the_losses_of_one_process(tmp_path, longtrain_cmd, activation, offload):
    one = train(longtrain_cmd, tmp_path / "one", "data.micro_batch_size=4", *activation)
    two = train(
        longtrain_cmd,
        tmp_path / "ds",
        "--nproc",
        "2",
        "parallel.shard=deepspeed",
        "data.micro_batch_size=2",
        *activation,
        *offload,
    )
    assert [r["step"] for r in two] == [1, 2, 3]
    assert one[-1]["loss"] < one[0]["loss"] - 0.1, "guard: training must move the loss"
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a["step"], a, b)
        tier = "optim_dram_bytes" if offload else "optim_device_bytes"
        # each rank holds half of the AdamW state
        assert b[tier] <= 0.5 * a["optim_device_bytes"] + 4096, (b[tier], a["optim_device_bytes"])
    if "activation.mode=tokenwise" in activation:
        # a rank offloads what one process offloads for the same rows, never a (gathered) parameter
        same_rows = train(longtrain_cmd, tmp_path / "rows", "data.micro_batch_size=2", *activation, steps=1)
        assert two[-1]["layer0_alpha"] == same_rows[-1]["layer0_alpha"] == 0.37
        for key in ("host_bytes", "layer0_host_bytes", "offload_rows_per_layer"):
            assert two[-1][key] == same_rows[-1][key] > 0, (key, two[-1][key], same_rows[-1][key])


@pytest.mark.skipif(not _deepspeed_op_built(), reason="DeepSpeed's cpu_adam op is not built")
def test_deepspeed_nvme_offload_writes_swap_files(tmp_path, longtrain_cmd):
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False) or not _aio_built():
        pytest.skip("DeepSpeed's async_io op is not built (needs libaio-dev and an ~8 min JIT build)")
    one = train(longtrain_cmd, tmp_path / "one", "data.micro_batch_size=4", "activation.mode=none")
    two = train(
        longtrain_cmd,
        tmp_path / "ds",
        "--nproc",
        "2",
        "parallel.shard=deepspeed",
        "data.micro_batch_size=2",
        "activation.mode=none",
        "optim.offload=nvme",
        f"optim.nvme_dir={tmp_path / 'nvme'}",
    )
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert b["optim_nvme_bytes"] > 0
    assert list((tmp_path / "nvme").rglob("*.swp")), "DeepSpeed wrote no swap files"


def _aio_built() -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    return any(Path(get_default_build_root()).glob("*/async_io/async_io*.so"))


def test_deepspeed_checkpoint_resumes_its_run_and_exports(tmp_path, longtrain_cmd, capsys):
    """checkpoint.every=2 under parallel.shard=deepspeed on 2 ranks: the step-2 checkpoint (full
    weights in longtrain's format + DeepSpeed's optimizer partitions, all in the manifest) resumes
    the same command with the losses of the uninterrupted run; another world size is refused
    naming the one to use; ``longtrain export`` reads the checkpoint."""
    import shutil

    from longtrain.checkpoint.sync import MANIFEST
    from longtrain.trainer.cli import main

    common = [c for c in COMMON if not c.startswith("checkpoint.")] + ["checkpoint.every=2", "train.steps=4"]
    ds = ["--nproc", "2", "parallel.shard=deepspeed", "data.micro_batch_size=2", "activation.mode=none"]
    out = tmp_path / "run"

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*longtrain_cmd, "train", "tiny_cpu", *extra, *common, f"output_dir={out}"],
            capture_output=True,
            text=True,
            timeout=240,
        )

    proc = run(*ds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step2 = out / "checkpoints" / "step-000002"
    manifest = json.loads((step2 / MANIFEST).read_text())
    assert {"model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(manifest["files"])
    assert any(name.startswith("deepspeed/") and "optim_states" in name for name in manifest["files"])
    shutil.rmtree(out / "checkpoints" / "step-000004")
    proc = run(*ds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert full[-1]["loss"] < full[0]["loss"], "guard: training moves the loss"
    for a, b in zip(full, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])
    shutil.rmtree(out / "checkpoints" / "step-000004")
    one_rank = run("parallel.shard=none", "activation.mode=none")
    assert one_rank.returncode != 0 and "--nproc 2" in one_rank.stderr, one_rank.stderr[-2000:]
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()

"""Step metrics: throughput, MFU, memory; written to stdout (tqdm), metrics.jsonl and wandb.

Only rank 0 logs. ``mem_peak_bytes`` is the device allocator peak on GPU and the process peak
RSS on CPU; ``mfu`` divides achieved model FLOP/s by a configured or detected peak (on CPU a
measured matmul peak, since CPUs publish no single number).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets, without sparsity).
# metric -> (console name, format) for the progress bar / printed line
_CONSOLE_FIELDS = {
    "loss": ("loss", lambda v: f"{v:.4f}"),
    "val_loss": ("val_loss", lambda v: f"{v:.4f}"),
    "lr": ("lr", lambda v: f"{v:.2e}"),
    "tokens_per_s": ("tok_s", lambda v: f"{v:.0f}"),
    "mem_peak_bytes": ("mem", lambda v: f"{v / 2**20:.0f}MiB"),
}

_GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "4090": 165e12,
}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def detect_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Per-device peak FLOP/s: a datasheet value on known GPUs, else a short measured matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAK_BF16.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2
    n = 1024  # large enough for the BLAS kernel to reach its steady rate
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def model_flops_per_token(num_params: int, num_layers: int, hidden_q: int, mean_doc_len: float) -> float:
    """Training FLOPs per token: 6N for the dense part (forward + backward) plus causal attention.

    Per document of length s, one layer's attention does 2 matmuls of s^2/2 * hidden_q
    multiply-adds forward (causal half), x3 for forward + backward: 6 * s^2 * hidden_q FLOPs,
    i.e. 6 * s * hidden_q per token.
    """
    return 6.0 * num_params + 6.0 * num_layers * hidden_q * mean_doc_len


def _drop_steps_after(path: Path, step: int) -> None:
    """A resumed run re-runs the steps after its checkpoint: drop their old lines so each step appears once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


class MetricsWriter:
    """Fans a metrics dict out to metrics.jsonl, a tqdm bar and (optionally) wandb; rank 0 only."""

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
        wandb_cfg: dict[str, Any] | None,
        config: dict[str, Any],
    ):
        self.enabled = enabled
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _drop_steps_after(out / "metrics.jsonl", start_step)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if wandb_cfg is not None:
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_cfg["project"],
                name=wandb_cfg.get("name"),
                config=config,
                dir=str(out),
                resume="allow",
                id=wandb_cfg.get("id"),
            )

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        # a validation-only line (train.eval_every between log steps) has just step and val_*
        fields = {name: fmt(metrics[key]) for key, (name, fmt) in _CONSOLE_FIELDS.items() if key in metrics}
        if self.bar is not None:
            fields.pop("lr", None)
            self.bar.set_postfix(fields, refresh=False)
        else:
            print(f"step {metrics['step']} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def warn(self, message: str) -> None:
        """``longtrain: warning: message`` on stderr (through the bar, so that it stays whole)."""
        if not self.enabled:
            return
        line = f"longtrain: warning: {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

"""``--dry-run``: what a job would need, computed without allocating the model or reading the data.

The report: parameter count (model built on the meta device), model-state bytes, the activation
bytes the configured ``activation.mode`` holds for backward on the device and on the host/file
tier, and which paths were checked (and which were not). The activation figures are estimates
from the config alone (planner/estimate.py: ``layer_bytes_per_token``; the token-wise split goes
through ``offload.cost.offloaded_bytes``, the rule the executor cuts rows with), followed by the
planner's per-device memory by category for the config as set; ``longtrain plan`` chooses a plan.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from longtrain.offload.plan import load_plan
from longtrain.planner.estimate import (
    ModelShape,
    activation_bytes,
    config_tokens,
    configured_memory,
    device_total,
    format_bytes,
    meta_model,
    plain_activation_bytes,
)
from longtrain.trainer.data import Tokenizer, load_tokenizer
from longtrain.trainer.data.sources import resolve_data_files

from .config import ConfigError, JobConfig
from .train import check_tokenizer

GIB = 2**30


def _activation_line(cfg: JobConfig, c: Any) -> str:
    act = cfg.activation
    if act.plan is not None:  # read and checked here too, so a bad plan file fails the dry run
        modes = Counter(layer.mode for layer in load_plan(act, c.num_hidden_layers).layers)
        per_mode = ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items()))
        return f"activations held for backward: per-layer plan activation.plan={act.plan} ({per_mode}; not estimated)"
    figures = activation_bytes(cfg, c)
    low, high = figures.offloaded
    device = f"device {format_bytes(figures.device)}"
    if act.mode in ("none", "recompute"):
        return f"activations held for backward (activation.mode={act.mode}): {device}"
    if act.mode == "offload":
        return f"activations held for backward (activation.mode=offload): {device}, host {format_bytes(low)}"
    options = f"activation.mode=tokenwise, alpha={act.alpha}, keep_last={act.keep_last}, tier={act.tier}"
    offloaded = f"{act.tier} {format_bytes(low)}"
    if act.alpha == "auto":
        offloaded = (
            f"{act.tier} {format_bytes(low)} (alpha 0) to {format_bytes(high)} (alpha 1); alpha=auto is "
            "resolved on the first step"
        )
    return f"activations held for backward ({options}): {device}, {offloaded}"


def _check_paths(cfg: JobConfig) -> tuple[list[str], list[str], Tokenizer | None]:
    """(what was checked, problems naming the key to change, the tokenizer if it loads)."""
    checked, problems = [], []
    if cfg.model.path:
        checked.append("model.path has config.json")
    if cfg.data.source == "bundled":
        checked.append("data.source=bundled needs no files")
    else:
        assert cfg.data.path is not None  # DataConfig requires it for every other source
        try:
            files = resolve_data_files(cfg.data.source, cfg.data.path)
            checked.append(f"data.path: {len(files)} file{'s' if len(files) > 1 else ''}")
        except ConfigError as e:
            problems.append(str(e))
    tokenizer = None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_tokenizer(cfg, tokenizer)
        checked.append(f"data.tokenizer loads (vocabulary {tokenizer.vocab_size})")
    except ConfigError as e:
        problems.append(str(e).splitlines()[0])
    return checked, problems, tokenizer


def dry_run_report(cfg: JobConfig) -> tuple[str, list[str]]:
    """(the report, problems): a few lines of sizes and checks, and one line per path that fails."""
    cfg.model.check_path()
    checked, problems, tokenizer = _check_paths(cfg)
    vocab_size = cfg.model.vocab_size or (tokenizer.vocab_size if tokenizer is not None else 4096)
    model = meta_model(cfg, vocab_size)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = n_params * 16  # fp32 weights + grads + Adam m, v
    offload = cfg.optim.offload
    device_state = state_bytes if offload == "none" else n_params * 8  # m, v off the device
    tokens = config_tokens(cfg)
    lines = [
        f"model: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {n_params / 1e6:.1f}M parameters",
        f"model states (fp32 weights, grads, AdamW): {state_bytes / GIB:.2f} GiB per data-parallel replica"
        + (
            f", {device_state / GIB:.2f} GiB of it on the device (optim.offload={offload})"
            if offload != "none"
            else ""
        ),
        f"tokens per micro-batch: {tokens}; plain autograd would hold "
        f"{format_bytes(plain_activation_bytes(cfg, c))} of activations",
        _activation_line(cfg, c),
    ]
    shape = ModelShape.of_model(model, cfg.train.dtype)
    mem = configured_memory(cfg, shape)
    on_device = ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items() if "." not in k and v)
    off_device = ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items() if "." in k and v)
    lines.append(
        f"planner estimate per device (as configured; `longtrain plan` chooses): {on_device}; total "
        f"{format_bytes(device_total(mem))}" + (f"; off the device: {off_device}" if off_device else "")
    )
    if device_state > 80 * GIB:
        lines.append(
            f"warning: model states on the device alone ({device_state / GIB:.0f} GiB) exceed one 80 GiB GPU; "
            "this job needs optim.offload (AdamW state in DRAM / CXL / NVMe) or sharding (planned)"
        )
    lines += [
        f"checked: {'; '.join(checked)}" if checked else "checked: no path passed (see the error below)",
        "not checked: the data's contents and loss tokens (read when training starts), checkpoint.resume, "
        "activation.file_dir, device memory",
    ]
    if not problems:
        lines.append("dry run: config is valid")
    return "\n".join(lines), problems

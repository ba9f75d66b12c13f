"""``--dry-run``: what a job would need, computed without allocating the model or reading the data.

The report: parameter count (model built on the meta device), model-state bytes, the activation
bytes the configured ``activation.mode`` holds for backward on the device and on the host/file
tier, and which paths were checked (and which were not). The activation figures are estimates
from the config alone (``layer_bytes_per_token``); the token-wise split goes through
``offload.cost.offloaded_bytes``, the rule the executor cuts rows with. The MIP planner replaces
them with a plan.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from longtrain.offload.cost import offloaded_bytes
from longtrain.offload.plan import load_plan
from longtrain.trainer.data import Tokenizer, load_tokenizer
from longtrain.trainer.data.sources import resolve_data_files

from .config import ConfigError, JobConfig
from .model.hf import head_dim_of, hf_config_from_sizes
from .train import check_tokenizer

GIB = 2**30


def model_config(cfg: JobConfig, vocab_size: int) -> Any:
    """The HF config of the job's model: ``model.path``'s, or built from the ``model.*`` sizes
    (``vocab_size``: the tokenizer's, unless ``model.vocab_size`` is set)."""
    if cfg.model.path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
    return hf_config_from_sizes(cfg.model, vocab_size, cfg.train.seq_len)


def meta_model(cfg: JobConfig, vocab_size: int):
    """The job's HF model on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(cfg, vocab_size))


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one decoder layer saves for backward per token, split as token-wise offload splits them."""

    whole: int  # layer input, attention output, logsumexp: offloaded whole
    rows: int  # the rest (norm outputs, q/k/v, MLP intermediates): first alpha*t rows offloaded


def layer_bytes_per_token(c: Any, dtype: str) -> LayerBytes:
    """Plain autograd keeps ~ (10 h + 4 kv + 3 ffn) values per token per layer (norms, q/k/v,
    attention out, residuals, MLP intermediates), in the activation dtype (bf16 halves them). Of
    those, the layer input (h), the attention output (heads x head_dim) and its logsumexp (one
    value per head) are the whole tensors (measured equal to the executor's in the tests)."""
    head_dim = head_dim_of(c)
    values = 10 * c.hidden_size + 4 * c.num_key_value_heads * head_dim + 3 * c.intermediate_size
    whole = c.hidden_size + c.num_attention_heads * head_dim + c.num_attention_heads
    nbytes = getattr(torch, dtype).itemsize
    return LayerBytes(whole=whole * nbytes, rows=(values - whole) * nbytes)


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes held for backward once a micro-batch's forward has ended."""

    device: int
    offloaded: tuple[int, int]  # host/file tier: (low, high), equal unless alpha is auto (alpha 0, 1)


def _tokens(cfg: JobConfig) -> int:
    """Token rows of one micro-batch on one rank: its packed rows (dp), their share of a cp group
    (cp; zigzag padding aside), at most the token capacity (hdp)."""
    rows = cfg.data.micro_batch_size * cfg.train.seq_len
    if cfg.parallel.mode == "hdp":
        return cfg.parallel.token_capacity or rows
    return -(-rows // cfg.parallel.context_parallel)


def plain_activation_bytes(cfg: JobConfig, c: Any) -> int:
    """What plain autograd saves for backward in one micro-batch's forward (all layers)."""
    per_token = layer_bytes_per_token(c, cfg.train.dtype)
    return c.num_hidden_layers * (per_token.whole + per_token.rows) * _tokens(cfg)


def activation_bytes(cfg: JobConfig, c: Any) -> ActivationBytes:
    """What ``activation.mode`` holds on the device and the host/file tier, per micro-batch."""
    act, t, layers = cfg.activation, _tokens(cfg), c.num_hidden_layers
    plain = plain_activation_bytes(cfg, c)
    if act.mode == "none":
        return ActivationBytes(device=plain, offloaded=(0, 0))
    if act.mode == "recompute":  # each layer's input; the layer is re-run in backward
        input_bytes = c.hidden_size * getattr(torch, cfg.train.dtype).itemsize * t
        return ActivationBytes(device=layers * input_bytes, offloaded=(0, 0))
    if act.mode == "offload":
        return ActivationBytes(device=0, offloaded=(plain, plain))
    per_token = layer_bytes_per_token(c, cfg.train.dtype)
    layer = plain // layers  # everything one layer saves
    kept = min(act.keep_last, layers)
    alphas = (0.0, 1.0) if act.alpha == "auto" else (float(act.alpha),) * 2
    low, high = (
        offloaded_bytes(per_token.whole * t, per_token.rows * t, alpha, t, layers - kept) for alpha in alphas
    )
    return ActivationBytes(device=kept * layer, offloaded=(low, high))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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
    tokens = _tokens(cfg)
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

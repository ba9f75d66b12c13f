"""``--dry-run``: what a job would need, computed without allocating the model.

The MIP planner replaces the activation estimate with a plan; this report is what can be known
from the config alone: parameter count (model built on the meta device), model-state bytes and
the plain-autograd activation bytes per micro-batch.
"""

from __future__ import annotations

import torch

from .config import JobConfig
from .model.hf import _hf_classes, head_dim_of, hf_config_from_sizes


def _meta_model(cfg: JobConfig, vocab_size: int):
    if cfg.model.path:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    hf_config = hf_config_from_sizes(cfg.model, vocab_size, cfg.train.seq_len)
    _, model_cls = _hf_classes(cfg.model.family)
    with torch.device("meta"):
        return model_cls(hf_config)


def dry_run_report(cfg: JobConfig, vocab_size: int = 4096) -> str:
    """A few lines: parameters, model-state bytes, activation bytes per micro-batch."""
    cfg.model.check_path()
    model = _meta_model(cfg, cfg.model.vocab_size or vocab_size)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = n_params * 16  # fp32 weights + grads + Adam m, v
    offload = cfg.optim.offload
    device_state = state_bytes if offload == "none" else n_params * 8  # m, v off the device
    tokens = cfg.data.micro_batch_size * cfg.train.seq_len
    # plain autograd keeps ~ (10 h + 4 kv + 3 ffn) values per token per layer (norms, q/k/v, attention
    # out, residuals, MLP intermediates); bf16 halves them.
    head_dim = head_dim_of(c)
    per_token_layer = 10 * c.hidden_size + 4 * c.num_key_value_heads * head_dim + 3 * c.intermediate_size
    act_bytes = per_token_layer * tokens * c.num_hidden_layers * (2 if cfg.train.dtype == "bfloat16" else 4)
    gib = 2**30
    return "\n".join(
        [
            f"model: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {n_params / 1e6:.1f}M parameters",
            f"model states (fp32 weights, grads, AdamW): {state_bytes / gib:.2f} GiB per data-parallel replica"
            + (
                f", {device_state / gib:.2f} GiB of it on the device (optim.offload={offload})"
                if offload != "none"
                else ""
            ),
            f"tokens per micro-batch: {tokens}; plain-autograd activations: {act_bytes / gib:.2f} GiB "
            f"(activation.mode={cfg.activation.mode} reduces this)",
            *(
                [
                    f"warning: model states on the device alone ({device_state / gib:.0f} GiB) exceed one 80 GiB GPU; "
                    "this job needs optim.offload (AdamW state in DRAM / CXL / NVMe) or sharding (planned)"
                ]
                if device_state > 80 * gib
                else []
            ),
            "dry run: config is valid",
        ]
    )

"""Tiny, non-degenerate models shared by the tests (``tests/`` is on ``sys.path`` via pytest's
``pythonpath`` setting, so test modules ``from tiny import ...``; conftest exposes the same as
the ``make_tiny_model`` fixture)."""

from __future__ import annotations

import torch

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.model.adapter import CausalLM, adapt
from longtrain.trainer.model.hf import build_hf_model

# Tiny sizes per family: llama with GQA (4 query heads share 2 kv heads), qwen2 with q/k/v
# biases, mistral without a sliding window. Large enough that every code path is exercised.
TINY_SIZES = dict(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=97
)


def tiny_model_config(family: str = "llama", **overrides) -> ModelConfig:
    return ModelConfig(**{"family": family, **TINY_SIZES, **overrides})


def tiny_hf_model(family: str = "llama", *, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """A randomly initialised tiny HF causal LM (``build_hf_model``), made "non-degenerate":

    HF initialises biases to 0 and norm weights to 1, which would hide a dropped bias or norm
    weight (say, in a rebuilt row); here they are random too. Weights use std 0.1 unless
    ``init_std`` is given, so attention is far from uniform.
    """
    cfg = tiny_model_config(family, **{"init_std": 0.1, **overrides})
    torch.manual_seed(seed)
    assert cfg.vocab_size is not None  # TINY_SIZES sets it
    model = build_hf_model(cfg, vocab_size=cfg.vocab_size, seq_len=128, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()  # no dropout anywhere (attention_dropout=0 as well)


def tiny_adapted_model(
    family: str = "llama",
    dtype: torch.dtype = torch.float64,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int | None = None,
    head_dim: int | None = None,
    vocab: int = 101,
    backend: str = "cpu_flash",
    seed: int = 0,
) -> CausalLM:
    """The adapted model the activation-memory tests use: hidden 64, GQA, ffn from HF's rounding."""
    hf = tiny_hf_model(
        family,
        dtype=dtype,
        seed=seed,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=ffn,
        head_dim=head_dim,
        vocab_size=vocab,
        init_std=0.02,
    )
    return adapt(hf, backend)


def tiny_snapshot(step: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A snapshot's tensors and meta as ``SnapshotCheckpointer._capture`` puts them in a slot: a
    small model with tied embeddings (stored once on disk), AdamW after one step, an LR
    scheduler, a data position and the RNG states."""
    from torch import nn

    from longtrain.checkpoint.flat import flatten
    from longtrain.checkpoint.persist import tied_names
    from longtrain.checkpoint.snapshot import rng_state

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    model[2].weight = model[0].weight
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.arange(4)).square().sum().backward()
    opt.step()
    sched.step()
    model_state = model.state_dict()
    tensors, tree = flatten(
        {
            "model": model_state,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": {"position": step, "epoch": (0, 1)},
            "rng": rng_state(),
        },
        "",
    )
    meta = {
        "step": step,
        "tree": tree,
        "model_config": {"hidden": 8},
        "world_size": 1,
        "tied": tied_names(model_state),
    }
    return tensors, meta

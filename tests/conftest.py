"""Shared test setup: offline environment, tiny HF models, the ``gpu`` marker.

Tests run with ``--import-mode=importlib``, so helpers reach test modules as fixtures
(``make_tiny_model``, ``longtrain_cmd``, ``free_port``), not by importing this file.

The environment variables are set at import time (before any test module imports transformers,
datasets or wandb) so that in-process runs and every subprocess a test starts inherit them.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.update(
    WANDB_MODE="disabled",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

from longtrain.trainer.config import ModelConfig  # noqa: E402
from longtrain.trainer.model.hf import build_hf_model  # noqa: E402

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
    weight; here they are random too, and weights use std 0.1 so attention is far from uniform.
    """
    cfg = tiny_model_config(family, **{"init_std": 0.1, **overrides})
    torch.manual_seed(seed)
    model = build_hf_model(cfg, vocab_size=cfg.vocab_size, seq_len=128, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()  # no dropout anywhere (attention_dropout=0 as well)


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def longtrain_command() -> list[str]:
    """The installed ``longtrain`` console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "longtrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "longtrain.trainer.cli"]


@pytest.fixture
def make_tiny_model():
    """Factory fixture: ``make_tiny_model(family, dtype=..., seed=..., **ModelConfig overrides)``."""
    return tiny_hf_model


@pytest.fixture
def longtrain_cmd() -> list[str]:
    return longtrain_command()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

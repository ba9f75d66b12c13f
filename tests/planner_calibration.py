"""Predicted vs measured device peak of eight activation plans (planner/estimate.py against the
device-bytes counter, offload/memory.py): ``python tests/planner_calibration.py`` prints a JSON
object plan -> predicted / measured (null without glibc's mallinfo2). Run in a fresh process by
test_planner_estimate.py: the counter reads the whole process heap.

Model: a 4-layer fp32 Llama (hidden 128, ffn 512, vocab 101) at 1024 tokens; one forward +
backward after a warm-up step, so the model states are live when counting starts and gradients
are the only state counted (they appear during backward, layer by layer)."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_adapted_model  # noqa: E402

from longtrain.offload import apply_activation_memory, memory  # noqa: E402
from longtrain.offload.memory import DeviceBytesCounter  # noqa: E402
from longtrain.planner.estimate import Job, LayerChoice, Layout, ModelShape, device_total, memory_bytes  # noqa: E402

CALIBRATION: dict[str, tuple[dict[str, Any], list[LayerChoice]]] = {
    "none": ({"mode": "none"}, [LayerChoice("keep")] * 4),
    "recompute": ({"mode": "recompute"}, [LayerChoice("recompute")] * 4),
    "recompute tiles": (
        {"mode": "recompute", "tile_rows": 256},
        [LayerChoice("recompute", tile_rows=256)] * 4,
    ),
    "tokenwise 0": ({"mode": "tokenwise", "alpha": 0.0, "keep_last": 0}, [LayerChoice("tokenwise", 0.0)] * 4),
    "tokenwise 0.5": (
        {"mode": "tokenwise", "alpha": 0.5, "keep_last": 0},
        [LayerChoice("tokenwise", 0.5)] * 4,
    ),
    "tokenwise 1": ({"mode": "tokenwise", "alpha": 1.0, "keep_last": 0}, [LayerChoice("tokenwise", 1.0)] * 4),
    "tokenwise 0.5 tiles": (
        {"mode": "tokenwise", "alpha": 0.5, "keep_last": 0, "tile_rows": 256},
        [LayerChoice("tokenwise", 0.5, tile_rows=256)] * 4,
    ),
    "tokenwise 0, 2 kept": (
        {"mode": "tokenwise", "alpha": 0.0, "keep_last": 2},
        [LayerChoice("tokenwise", 0.0)] * 2 + [LayerChoice("keep")] * 2,
    ),
}


def measure() -> dict[str, float] | None:
    if memory._MALLINFO2 is None:
        return None
    torch.set_num_threads(1)
    t, vocab = 1024, 101
    ids = torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(0))
    ratios = {}
    for name, (activation, layers) in CALIBRATION.items():
        model = tiny_adapted_model("llama", torch.float32, layers=4, hidden=128, ffn=512, vocab=vocab)
        apply_activation_memory(model, activation)
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        with DeviceBytesCounter(torch.device("cpu")) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        model.layer_executor.close()
        params = sum(p.numel() for p in model.parameters())
        other = 2 * vocab * 128 + 128  # embeddings, LM head, final norm
        shape = ModelShape(4, 128, 4, 2, 32, 512, vocab, (params - other) // 4, other, 4)
        mem = memory_bytes(shape, Layout(1), Job(t), layers)
        held = {k: v for k, v in mem.items() if k not in ("params", "param_casts", "optimizer")}
        ratios[name] = device_total(held) / counter.peak_bytes
    return ratios


if __name__ == "__main__":
    print(json.dumps(measure()))

"""Predicted vs measured device peak and step time of eight activation plans (planner/estimate.py
against the device-bytes counter, offload/memory.py, and the clock):
``python tests/planner_calibration.py`` prints a JSON object plan -> predicted / measured peak
(null without glibc's mallinfo2), ``--time`` plan -> predicted / measured step time. Run in a
fresh process by test_planner_estimate.py: the counter reads the whole process heap.

Time: the step's pieces are measured once (planner/profile.py: one layer's forward and backward,
its row-wise parts, the cost of a 256-row tile, head + loss, the AdamW step) and every plan's time
is composed from them (estimate.step_seconds); measured: forward + backward + AdamW step, the
fastest of 8 after a warm-up (in ``TIME_ROUNDS`` rounds interleaved with the profile's), on one
thread (the copy threads get the other core).

Model: a 4-layer fp32 Llama (hidden 128, ffn 512, vocab 101) at 1024 tokens; one forward +
backward after a warm-up step, so the model states are live when counting starts and gradients
are the only state counted (they appear during backward, layer by layer)."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_adapted_model  # noqa: E402

from longtrain.offload import apply_activation_memory, memory  # noqa: E402
from longtrain.offload.memory import DeviceBytesCounter  # noqa: E402
from longtrain.planner.decide import uniform_alpha  # noqa: E402
from longtrain.planner.estimate import (  # noqa: E402
    Job,
    LayerChoice,
    Layout,
    ModelShape,
    device_total,
    memory_bytes,
    step_seconds,
)
from longtrain.planner.hardware import measure_cpu  # noqa: E402
from longtrain.planner.profile import StepTimes, measure_times  # noqa: E402

TOKENS, VOCAB, TILE_ROWS, TIME_ROUNDS = 1024, 101, 256, 4

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


def _model(activation: dict[str, Any]) -> Any:
    model = tiny_adapted_model("llama", torch.float32, layers=4, hidden=128, ffn=512, vocab=VOCAB)
    apply_activation_memory(model, activation)
    return model


def _shape(model: Any) -> ModelShape:
    params = sum(p.numel() for p in model.parameters())
    other = 2 * VOCAB * 128 + 128  # embeddings, LM head, final norm
    return ModelShape(4, 128, 4, 2, 32, 512, VOCAB, (params - other) // 4, other, 4)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def measure() -> dict[str, float] | None:
    if memory._MALLINFO2 is None:
        return None
    torch.set_num_threads(1)
    ids = _ids()
    ratios = {}
    for name, (activation, layers) in CALIBRATION.items():
        model = _model(activation)
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        with DeviceBytesCounter(torch.device("cpu")) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        model.layer_executor.close()
        mem = memory_bytes(_shape(model), Layout(1), Job(TOKENS), layers)
        held = {k: v for k, v in mem.items() if k not in ("params", "param_casts", "optimizer")}
        ratios[name] = device_total(held) / counter.peak_bytes
    return ratios


def _min_times(a: StepTimes | None, b: StepTimes) -> StepTimes:
    if a is None:
        return b
    return StepTimes(b.tokens, *(min(getattr(a, f), getattr(b, f)) for f in _TIME_FIELDS))


_TIME_FIELDS = ("layer_forward_s", "layer_backward_s", "rowwise_forward_s", "tile_s", "head_s", "optimizer_s")


def measure_time(
    rounds: int = TIME_ROUNDS, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, float]]:
    """Per plan: predicted and measured seconds and their ratio. The profile and the plans' steps
    are measured in interleaved rounds and every figure is its fastest over all rounds, so load
    that comes and goes on the machine (another job's benchmark) leaves both sides alike.
    ``clock``: wall time, or ``time.thread_time`` (``--cpu-time``): the calling thread's CPU time,
    which another job's load does not stretch; it leaves out the waits for the copy threads, which
    at this machine's memcpy speed are short."""
    torch.set_num_threads(1)
    ids = _ids()
    hw = measure_cpu()
    probe = _model({"mode": "none"})
    runs = {}
    for name, (activation, _) in CALIBRATION.items():
        model = _model(activation)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), [float("inf")])
    for model, opt, _ in runs.values():
        _step(model, opt, ids, clock)  # warm-up
    times: StepTimes | None = None
    for _ in range(rounds):
        times = _min_times(times, measure_times(probe, ids, tile_rows=TILE_ROWS, runs=2, clock=clock))
        for model, opt, best in runs.values():
            best[0] = min(best[0], *(_step(model, opt, ids, clock) for _ in range(2)))
    assert times is not None
    out = {}
    for name, (model, _, best) in runs.items():
        model.layer_executor.close()
        layers = CALIBRATION[name][1]
        predicted = sum(step_seconds(_shape(model), Layout(1), Job(TOKENS), layers, hw, times).values())
        out[name] = {"predicted_s": predicted, "measured_s": best[0], "ratio": predicted / best[0]}
    return out


def _step(
    model: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, clock: Callable[[], float] = time.perf_counter
) -> float:
    t0 = clock()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clock() - t0


SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


def alpha_sweep(link_gbps: float, rounds: int = TIME_ROUNDS) -> dict[str, Any]:
    """Behind an emulated link of ``link_gbps`` GB/s (activation.link_gbps): the alpha the
    planner picks for four token-wise layers (decide.uniform_alpha on this machine's profile, the
    link as the device-host bandwidth) and the measured step time of it and of a sweep of
    alphas. First ``rounds`` rounds of the profile interleaved with the sweep's steps (the
    profile is the fastest over them), then the planned alpha is chosen and ``rounds`` more
    rounds step it and the sweep alike; every step time is the fastest of its runs."""
    torch.set_num_threads(1)
    ids = _ids()
    hw = dataclasses.replace(measure_cpu(), device_to_host_bps=link_gbps * 1e9)
    probe = _model({"mode": "none"})
    shape = _shape(probe)

    def build(a: float) -> tuple[Any, torch.optim.Optimizer, list[float]]:
        model = _model({"mode": "tokenwise", "alpha": a, "keep_last": 0, "link_gbps": link_gbps})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _step(model, opt, ids)  # warm-up
        return model, opt, [float("inf")]

    def round_of(runs: dict[float, tuple[Any, torch.optim.Optimizer, list[float]]]) -> None:
        for model, opt, best in runs.values():
            best[0] = min(best[0], *(_step(model, opt, ids) for _ in range(2)))

    runs = {a: build(a) for a in SWEEP}
    times: StepTimes | None = None
    for _ in range(rounds):
        times = _min_times(times, measure_times(probe, ids, runs=2))
        round_of(runs)
    assert times is not None
    planned = round(uniform_alpha(shape, Layout(1), Job(TOKENS), hw, times=times), 4)
    if planned not in runs:
        runs[planned] = build(planned)
    for _ in range(rounds):
        round_of(runs)
    for model, _, _ in runs.values():
        model.layer_executor.close()
    measured = {a: best[0] for a, (_, _, best) in sorted(runs.items())}
    return {
        "link_gbps": link_gbps,
        "planned_alpha": planned,
        "step_s": {str(a): s for a, s in measured.items()},
        "planned_vs_best": measured[planned] / min(measured.values()),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--time" in args:
        print(json.dumps(measure_time(clock=time.thread_time if "--cpu-time" in args else time.perf_counter)))
    elif "--link" in args:
        print(json.dumps(alpha_sweep(float(args[args.index("--link") + 1]))))
    else:
        print(json.dumps(measure()))

"""``longtrain plan RECIPE [overrides] [hardware=NAME] [hardware.FIELD=V] [--gpus N] [--json] [--write FILE]``

Will the job fit, how fast will it run, and what to change if it does not: per-device memory by
category, the layout (cp, sharding, optimizer tier), alpha and tile_rows per layer, predicted step
time and MFU, the longest sequence that fits, and a verdict with the smallest change that would
fit. ``--write FILE`` writes the ``activation.plan`` file and prints the overrides that run it.

Keys given on the command line stay as set (activation.mode/alpha/tier/keep_last/tile_rows,
parallel.context_parallel/mode/shard, optim.offload); the rest is chosen (planner/decide.py).
``hardware=NAME``: planner/hardware.py (default h100_80g); ``hardware.FIELD=V`` overrides one of
its fields (e.g. hardware.host_bytes=1e12, hardware.gpus_per_node=4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longtrain.config_checks import ConfigError

from .decide import Fixed, Plan, max_seq_len, search, states_outside_arena
from .estimate import Job, ModelShape, format_bytes
from .hardware import Hardware, hardware
from .step_arena import plan_step

if TYPE_CHECKING:
    from .profile import StepTimes

DEFAULT_HARDWARE = "h100_80g"
_OPTIM_TIER = {"none": "device", "dram": "dram", "cxl": "dram", "nvme": "nvme", "auto": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (see `longtrain recipes`) or path to a YAML file")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra-style overrides, hardware=NAME, hardware.FIELD=VALUE"
    )
    parser.add_argument("--gpus", type=int, help="number of GPUs (default: the recipe's world size, else 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write", metavar="FILE", help="write the activation.plan file here")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="draw the arena layout and the per-layer alpha / mode / tier here"
    )


def _split_overrides(
    overrides: list[str], name: str = DEFAULT_HARDWARE
) -> tuple[list[str], str, dict[str, float]]:
    """(job overrides, hardware name (``name`` unless given), hardware field overrides)."""
    job, fields = [], {}
    known = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
    for item in overrides:
        key, eq, value = item.partition("=")
        if key == "hardware" and eq:
            name = value
        elif key.startswith("hardware.") and eq:
            field = key.removeprefix("hardware.")
            if field not in known:
                raise ConfigError(f"unknown key {key}; hardware fields: {', '.join(sorted(known))}")
            try:
                fields[field] = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        else:
            job.append(item)
    return job, name, fields


def _hardware(name: str, fields: dict[str, float]) -> Hardware:
    hw = hardware(name)
    if not fields:
        return hw
    values: dict[str, Any] = {}
    for key, value in fields.items():
        kind = type(getattr(hw, key))
        values[key] = int(value) if kind is int else value
    return dataclasses.replace(hw, **values)


def fixed_from(cfg: Any, explicit: set[str]) -> Fixed:
    """What the command line fixed (``explicit``: the override keys) plus the budgets."""
    act, par = cfg.activation, cfg.parallel
    cp = None
    if "parallel.context_parallel" in explicit or ("parallel.mode" in explicit and par.mode != "cp"):
        cp = par.context_parallel
    tile = act.tile_rows if "activation.tile_rows" in explicit and act.tile_rows != "auto" else None
    return Fixed(
        mode=act.mode if "activation.mode" in explicit else None,
        alpha=float(act.alpha) if "activation.alpha" in explicit and act.alpha != "auto" else None,
        tier=act.tier if "activation.tier" in explicit else None,
        keep_last=act.keep_last if "activation.keep_last" in explicit else None,
        tile_rows=int(tile) if tile is not None else None,
        cp=cp,
        shard=par.shard if "parallel.shard" in explicit else None,
        optim_tier=_OPTIM_TIER[cfg.optim.offload] if "optim.offload" in explicit else None,
        host_budget=act.host_budget_bytes,
        dram_budget=cfg.optim.dram_budget_bytes,
    )


def _suggestion(shape: ModelShape, job: Job, hw: Hardware, gpus: int, fixed: Fixed, longest: int) -> str:
    """The smallest change that fits: freeing one key the command line fixed, else a shorter
    sequence, else more GPUs."""
    names = {
        "mode": "activation.mode",
        "alpha": "activation.alpha",
        "tier": "activation.tier",
        "keep_last": "activation.keep_last",
        "tile_rows": "activation.tile_rows",
        "cp": "parallel.context_parallel",
        "shard": "parallel.shard",
        "optim_tier": "optim.offload",
    }
    out = []
    for name, key in names.items():
        if getattr(fixed, name) is None:
            continue
        freed = dataclasses.replace(fixed, **{name: None})
        if search(shape, job, hw, gpus, freed, first=True).fits:
            out.append(f"drop {key}={getattr(fixed, name)} and let the planner choose it")
    if 0 < longest < job.seq_len:
        out.append(f"lower train.seq_len to {longest}")
    for more in (2, 4, 8, 16, 32, 64, 128):
        if search(shape, job, hw, gpus * more, fixed, first=True).fits:
            out.append(f"use --gpus {gpus * more}")
            break
    return (
        "; or ".join(out) if out else "no change of seq_len, GPUs or the fixed keys fits; use larger devices"
    )


_SHAPES: dict[tuple[Any, ...], ModelShape] = {}


def _shape(cfg: Any) -> ModelShape:
    """``ModelShape.of_config``, remembered per model config (building the meta model takes ~2 s;
    parameter counts do not depend on the sequence length)."""
    key = (dataclasses.astuple(cfg.model), cfg.train.dtype)
    if key not in _SHAPES:
        _SHAPES[key] = ModelShape.of_config(cfg)
    return _SHAPES[key]


def measured_times(cfg: Any, shape: ModelShape) -> StepTimes | None:
    """The step's pieces of ``cfg``'s model measured on this CPU at one micro-batch
    (planner/profile.py; tiles at the smallest tile the search tries), or None when the model is
    too large to build here (its states past a quarter of the available memory)."""
    import torch

    from longtrain.trainer.model.adapter import adapt
    from longtrain.trainer.model.hf import build_hf_model

    from .decide import MIN_TILE_ROWS
    from .hardware import meminfo
    from .profile import measure_times

    t = cfg.train.seq_len * cfg.data.micro_batch_size
    room = meminfo()["MemAvailable"] // 4
    if 16 * shape.params > room or t * (shape.plain_bytes + 4 * shape.vocab) > room:
        return None
    torch.manual_seed(cfg.seed)
    dtype = cfg.train.torch_dtype
    hf = build_hf_model(cfg.model, vocab_size=shape.vocab, seq_len=cfg.train.seq_len, dtype=dtype)
    ids = torch.randint(0, shape.vocab, (cfg.data.micro_batch_size, cfg.train.seq_len))
    return measure_times(adapt(hf), ids, tile_rows=MIN_TILE_ROWS if MIN_TILE_ROWS < t else 0)


def plan_job(
    recipe: str, overrides: list[str], gpus: int | None, default_hardware: str = DEFAULT_HARDWARE
) -> tuple[Any, Plan, dict[str, Any], Hardware, int]:
    """Plan ``recipe`` with ``overrides`` (job keys, hardware=NAME, hardware.FIELD=V) on ``gpus``
    devices: (config, best plan, the JSON result, hardware, gpus). An emulated link
    (activation.link_gbps) is the hardware's device-host bandwidth."""
    from longtrain.trainer.compose import compose

    job_overrides, name, fields = _split_overrides(overrides, default_hardware)
    hw = _hardware(name, fields)
    cfg = compose(recipe, job_overrides)
    if cfg.activation.plan is not None:
        raise ConfigError("longtrain plan writes activation.plan (--write FILE); drop activation.plan")
    if cfg.activation.link_gbps is not None:
        hw = dataclasses.replace(hw, device_to_host_bps=cfg.activation.link_gbps * 1e9)
    if gpus is None:
        par = cfg.parallel
        gpus = par.data_parallel * par.context_parallel if par.data_parallel > 0 else par.context_parallel
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    explicit = {item.partition("=")[0].lstrip("+~") for item in job_overrides}
    fixed = fixed_from(cfg, explicit)
    shape = _shape(cfg)
    job = Job(cfg.train.seq_len, cfg.data.micro_batch_size, cfg.train.grad_accum)
    # this machine: its measured step pieces rather than FLOPs at a GPU's efficiency
    times = measured_times(cfg, shape) if hw.name == "cpu" and gpus == 1 else None
    best = search(shape, job, hw, gpus, fixed, times=times)
    longest = max_seq_len(shape, job, hw, gpus, fixed)
    est = best.estimate
    # the plan's own level-2 layout, the one its verdict counts (a plan that failed before level 2
    # was needed gets one solved the same way, greedy)
    step = best.arena or plan_step(shape, best.layout, job, best.layers, quick=True)
    states = states_outside_arena(shape, best.layout)  # allocated once, outside the arena
    tokenwise = [c for c in best.layers if c.mode == "tokenwise"]
    result: dict[str, Any] = {
        "fits": best.fits,
        "hardware": hw.name,
        "gpus": gpus,
        "seq_len": job.seq_len,
        "tokens_per_rank": job.tokens_per_rank(best.layout.cp),
        "layout": dataclasses.asdict(best.layout),
        "modes": [c.mode for c in best.layers],
        "alpha": [c.alpha if c.mode == "tokenwise" else None for c in best.layers],
        "tiers": [c.tier if c.mode == "tokenwise" else None for c in best.layers],
        "tile_rows": [c.tile_rows for c in best.layers],
        "mem_bytes": {**est.mem_bytes, "arena_peak": step.peak, "arena_fragmentation": step.fragmentation},
        "arena": {
            **step.summary(),
            "level": 2,
            "device_bytes": states + step.peak,
            # fits requires this besides the estimate's device total and the tiers
            "fits_device": states + step.peak <= hw.usable_device_bytes,
            "blocks": "cost model",
        },
        "device_bytes": est.device_bytes,
        "device_capacity_bytes": hw.usable_device_bytes,
        "host_bytes_per_node": est.host_bytes_per_node,
        "file_bytes_per_node": est.file_bytes_per_node,
        "over_bytes": best.over,
        "predicted_step_s": est.step_s,
        "predicted_parts_s": est.parts_s,
        "predicted_mfu": est.mfu,
        "time_model": "measured"
        if times is not None and times.tokens == job.tokens_per_rank(best.layout.cp)
        else "flops",
        "max_seq_len": longest,
        "suggestion": None if best.fits else _suggestion(shape, job, hw, gpus, fixed, longest),
        "tokenwise_layers": len(tokenwise),
    }
    return cfg, best, result, hw, gpus


def _layers_line(result: dict[str, Any]) -> str:
    """The layers grouped by (mode, alpha, tier, tile_rows), bottom up."""
    modes: dict[tuple[Any, ...], int] = {}
    for m, a, tier, r in zip(
        result["modes"], result["alpha"], result["tiers"], result["tile_rows"], strict=True
    ):
        key = (m, a, tier, r)
        modes[key] = modes.get(key, 0) + 1
    return "; ".join(
        f"{n} x {m}"
        + (f" alpha {a:.4f} on {tier}" if m == "tokenwise" else "")
        + (f" tile_rows {r}" if r else "")
        for (m, a, tier, r), n in modes.items()
    )


def _text(recipe: str, result: dict[str, Any], hw: Hardware) -> str:
    lay = result["layout"]
    mem = result["mem_bytes"]
    device = ", ".join(
        f"{k} {format_bytes(v)}" for k, v in mem.items() if "." not in k and not k.startswith("arena") and v
    )
    arena = result["arena"]
    off = ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items() if "." in k and v)
    layers = _layers_line(result)
    verdict = (
        "fits" if result["fits"] else f"does NOT fit (over: {result['over_bytes']}); {result['suggestion']}"
    )
    return "\n".join(
        [
            f"plan: {recipe} on {result['gpus']} x {hw.name}, seq_len {result['seq_len']} "
            f"({result['tokens_per_rank']} tokens per rank)",
            f"layout: context parallel {lay['cp']}, shard {lay['shard']}, optimizer state on {lay['optim_tier']}",
            f"per device: {device}; total {format_bytes(result['device_bytes'])} of "
            f"{format_bytes(result['device_capacity_bytes'])} usable",
            f"arena (level 2, {arena['tensors']} tensors around one block per layer pass): peak "
            f"{format_bytes(arena['peak'])}, {format_bytes(arena['fragmentation'])} above the bytes live "
            f"at once ({arena['method']}, {arena['solve_s']:.2f} s); with the model states "
            f"{format_bytes(arena['device_bytes'])}"
            + ("" if arena["fits_device"] else " (over the usable device memory)"),
            f"off the device (per device): {off or 'nothing'}; per node host "
            f"{format_bytes(result['host_bytes_per_node'])} of {format_bytes(hw.host_bytes)}, file "
            f"{format_bytes(result['file_bytes_per_node'])} of {format_bytes(hw.nvme_bytes)}",
            f"layers: {layers}",
            f"predicted step {result['predicted_step_s']:.3f} s, MFU {100 * result['predicted_mfu']:.1f}% "
            f"({', '.join(f'{k} {v:.3f}' for k, v in result['predicted_parts_s'].items() if v)}; "
            f"{'from measured step pieces' if result['time_model'] == 'measured' else 'FLOPs at 60% of peak'})",
            f"longest sequence that fits: {result['max_seq_len']}",
            f"verdict: {verdict}",
        ]
    )


def plan_for_training(recipe: str, overrides: list[str], output_dir: str, hardware_name: str) -> list[str]:
    """``longtrain train RECIPE planner.auto=true``: plan the job as ``longtrain plan`` would (on
    ``hardware_name``, the recipe's world size), write the plan to ``output_dir``/plan.json and
    return the overrides that run it, the user's ``overrides`` last so a key set there stays as
    set. A plan that does not fit is a one-line error with the smallest change that would."""
    if any(item.partition("=")[0].lstrip("+~") == "activation.plan" for item in overrides):
        raise ConfigError(
            "planner.auto=true writes activation.plan itself; drop activation.plan or planner.auto"
        )
    planning = [item for item in overrides if not item.lstrip("+~").startswith("planner.")]
    cfg, best, result, hw, gpus = plan_job(recipe, planning, None, hardware_name)
    if not best.fits:
        raise ConfigError(
            f"planner.auto: the job does not fit {gpus} x {hw.name} (over: {result['over_bytes']}); "
            f"{result['suggestion']}"
        )
    path = Path(output_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    best.write(path)
    kept = [item for item in overrides if item.lstrip("+~").partition("=")[0] != "planner.auto"]
    return [*best.overrides(str(path), output_dir), *kept, "planner.auto=false"]


def run(args: argparse.Namespace) -> int:
    """Print the plan; write the plan file with ``--write`` and its picture with ``--plot``. Exit
    status 0 when it fits, 1 when not."""
    from .plot import check_writable, plan_png

    if args.plot and (why := check_writable(args.plot)):
        raise ConfigError(f"--plot {args.plot}: {why}")
    cfg, best, result, hw, gpus = plan_job(args.recipe, args.overrides, args.gpus)
    if args.plot:
        job = Job(cfg.train.seq_len, cfg.data.micro_batch_size, cfg.train.grad_accum)
        step = best.arena or plan_step(_shape(cfg), best.layout, job, best.layers, quick=True)
        title = (
            f"{args.recipe} on {gpus} x {hw.name}, seq_len {result['seq_len']}: "
            f"{'fits' if result['fits'] else 'does not fit'}, step {result['predicted_step_s']:.3g} s"
        )
        try:
            Path(args.plot).write_bytes(plan_png(result, step, _layers_line(result), title))
        except OSError as e:
            raise ConfigError(f"--plot {args.plot}: {e.strerror or e}") from None
        result["plot_file"] = args.plot
    if args.write:
        best.write(args.write)
        result["plan_file"] = args.write
        result["overrides"] = best.overrides(args.write, cfg.output_dir)
    if args.json:
        print(json.dumps(result))
    else:
        print(_text(args.recipe, result, hw))
        if args.write:
            print(
                f"wrote {args.write}; run it with: longtrain train {args.recipe} {' '.join(result['overrides'])}"
            )
    return 0 if result["fits"] else 1

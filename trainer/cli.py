"""``longtrain`` command line.

    longtrain train RECIPE [key=value ...] [--nproc N] [--dry-run]
    longtrain recipes
    longtrain export RUN_DIR OUT_DIR [--step N]
    longtrain simulate --ranks N --context L [--lengths FILE.json] [--json] [--png PATH]
    longtrain plan RECIPE [key=value ...] [hardware=NAME] [--gpus N] [--json] [--write FILE]

RECIPE is a name from recipes/ or a YAML path; overrides use Hydra syntax. ``--nproc N`` starts N
local processes through torch.distributed.run, each running ``python -m longtrain.trainer``.
``export`` writes a run's checkpoint as a Hugging Face model directory (``export.py``).
``simulate`` compares a static DP x CP mesh, naive HDP and balanced HDP on a length distribution
with the planner and cost model (``parallel/simulate.py``; docs/parallel.md). ``plan`` says
whether a job fits a hardware description and writes the plan that runs it (``planner/cli.py``).
User errors (config keys, files, checkpoints, world size) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .compose import available_recipes, compose, to_yaml
from .config import ConfigError, JobConfig

# User input is checked where it enters and raises ConfigError (CheckpointError is one); any other
# exception is a bug and keeps its traceback.
USER_ERRORS = (ConfigError,)


def _fail(message: str) -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(f"longtrain: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtrain", description="Memory-efficient long-context training.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with a recipe")
    # nargs="?": argparse would otherwise report a missing recipe as "recipe, overrides are required"
    train.add_argument(
        "recipe", nargs="?", help="recipe name (see `longtrain recipes`) or path to a YAML file"
    )
    train.add_argument("overrides", nargs="*", help="optional Hydra-style overrides, e.g. train.steps=10")
    train.add_argument("--nproc", type=int, default=1, help="local processes (torch.distributed.run)")
    train.add_argument(
        "--dry-run", action="store_true", help="compose, validate and print the plan; do not train"
    )
    sub.add_parser("recipes", help="list the bundled recipes")
    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory")
    export.add_argument("run_dir", help="a training output_dir (it holds config.yaml and checkpoints/)")
    export.add_argument("out_dir", help="the directory to write (new, or empty)")
    export.add_argument(
        "--step", type=int, help="checkpoint step to export (default: the newest complete one)"
    )
    # its options are parsed by run_simulate (they live with the simulator, whose imports are heavy)
    sub.add_parser(
        "simulate",
        help="simulate a static DP x CP mesh vs naive and balanced HDP on document lengths "
        "(longtrain simulate --help)",
        add_help=False,
    )
    sub.add_parser(
        "plan",
        help="will a job fit (memory per device, alpha per layer, step time), and the plan that runs it "
        "(longtrain plan --help)",
        add_help=False,
    )
    return parser


def run_plan(argv: list[str]) -> int:
    from longtrain.planner.cli import add_arguments, run

    parser = argparse.ArgumentParser(
        prog="longtrain plan",
        description="Memory and step time of a job on a hardware description; the plan that fits.",
    )
    add_arguments(parser)
    # overrides may follow options (`plan RECIPE --gpus 8 activation.mode=none`), as for train
    args, extra = parser.parse_known_args(argv)
    if any(e.startswith("-") for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    try:
        return run(args)
    except USER_ERRORS as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def run_simulate(argv: list[str]) -> int:
    from longtrain.parallel.simulate import add_arguments, print_result, run

    parser = argparse.ArgumentParser(
        prog="longtrain simulate",
        description="Static DP x CP mesh vs naive HDP vs balanced HDP (planner + cost model).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as e:
        return _fail(str(e))
    print_result(result, args.json)
    return 0


def planned_overrides(recipe: str, overrides: list[str], cfg: JobConfig) -> list[str]:
    """planner.auto=true: the overrides that run the plan written under output_dir (planner.auto
    false in them, so the ranks and a resumed run read the file instead of planning again)."""
    from longtrain.planner.cli import plan_for_training

    out = plan_for_training(recipe, overrides, cfg.output_dir, cfg.planner.hardware)
    if os.environ.get("RANK", "0") == "0":
        print(f"longtrain: planner.auto: running {recipe} {' '.join(out)}", flush=True)
    return out


def run_train(recipe: str, overrides: list[str], dry_run: bool = False) -> int:
    """Compose, prepare, train (the body of ``python -m longtrain.trainer`` on every rank)."""
    from .train import prepare  # heavy imports after argument parsing

    try:
        cfg = compose(recipe, overrides)
        if cfg.planner.auto:
            overrides = planned_overrides(recipe, overrides, cfg)
            cfg = compose(recipe, overrides)
        if dry_run:
            from .plan import dry_run_report

            report, problems = dry_run_report(cfg)  # may raise a user error: print nothing before it
            print(to_yaml(cfg))
            print(report, flush=True)
            if problems:  # the sizes above still hold; the job itself would stop here
                more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if problems[1:] else ""
                return _fail(f"dry run: {problems[0]}{more}")
            return 0
        job = prepare(cfg)
    except USER_ERRORS as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    try:
        if job.start_step >= cfg.train.steps:
            if job.mesh.is_main:
                print(f"longtrain: {cfg.output_dir} already finished {cfg.train.steps} steps; nothing to do")
            return 0
        logged = job.run()
        if job.mesh.is_main and logged:
            last = logged[-1]
            print(
                f"longtrain: done: step {last['step']} loss {last['loss']:.4f}; outputs in {cfg.output_dir}"
            )
    finally:
        job.close()
    return 0


def run_export(run_dir: str, out_dir: str, step: int | None) -> int:
    from .export import export  # heavy imports after argument parsing

    try:
        checkpoint = export(run_dir, out_dir, step)
    except USER_ERRORS as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(
        f"longtrain: exported {checkpoint} to {out_dir} (load it with AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def _launch(recipe: str, overrides: list[str], nproc: int) -> int:
    from torch.distributed import run as torchrun

    if nproc < 1:
        return _fail(f"--nproc must be >= 1, got {nproc}")
    try:
        cfg = compose(recipe, overrides)  # fail fast, once, before starting processes
        cfg.checkpoint.check_ranks(nproc)
        if cfg.planner.auto:  # planned once here: the ranks run the written file
            overrides = planned_overrides(recipe, overrides, cfg)
    except USER_ERRORS as e:
        return _fail(str(e))
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "longtrain.trainer", recipe, *overrides]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        torchrun.main(args)
    except SignalException as e:  # torchrun passed it on to the ranks, which save and stop
        print(
            f"longtrain: stopped by {signal.Signals(e.sigval).name}; re-run the same command to continue",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    except Exception as e:  # ChildFailedError: rank 0 already printed the error
        codes = {f.exitcode for f in getattr(e, "failures", {}).values()}
        stopped = {-signal.SIGTERM, -signal.SIGKILL}  # ranks torchrun stopped once one had failed
        if 2 in codes and codes <= {2, *stopped}:
            return 2  # a user error, reported in one line by rank 0
        print(
            f"longtrain: error: a training process failed ({type(e).__name__}); see its output above",
            file=sys.stderr,
        )
        return 1
    return 0


def _quiet_deepspeed_detection() -> None:
    """transformers imports DeepSpeed's integration when it saves or loads a model, and DeepSpeed
    then warns that it "sets the accelerator to CPU" on a machine without CUDA. Naming the CPU
    accelerator up front (as DeepSpeed's docs do for CPU runs) keeps that warning out of every
    command's output; a user's own DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    _quiet_deepspeed_detection()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        return run_simulate(argv[1:])
    if argv[:1] == ["plan"]:
        return run_plan(argv[1:])
    parser = _parser()
    # Overrides may follow options (`train tiny_cpu --nproc 2 train.steps=3`): argparse leaves
    # positionals that come after an option unparsed, so they are appended to the overrides here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "recipes":
        print("\n".join(available_recipes()))
        return 0
    if args.command == "export":
        return run_export(args.run_dir, args.out_dir, args.step)
    if args.recipe is None:
        return _fail(
            "longtrain train needs a recipe: a bundled name (list them with `longtrain recipes`) "
            "or a YAML path, e.g. `longtrain train tiny_cpu`"
        )
    if args.nproc != 1 and not args.dry_run:
        return _launch(args.recipe, args.overrides, args.nproc)
    return run_train(args.recipe, args.overrides, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

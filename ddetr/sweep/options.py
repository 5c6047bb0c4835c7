"""The command line of a sweep, `ddetr tune ...` (and `python tune/sweep.py ...`); importing it loads no Ray."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `ddetr tune` (and `python tune/sweep.py`)."""
    p.add_argument(
        "--preset", default="deformable_detr", help="base preset (ddetr.config.PRESETS; default: %(default)s)"
    )
    p.add_argument("--data", required=True, help="folder with train/ and val/ shards (or DIR/shards/...)")
    p.add_argument(
        "--space",
        default=None,
        help="search space YAML (default: the packaged paper-scale space, ddetr/sweep/spaces/default.yaml: focal "
        "weight and alpha, 100/300 queries, refinement, lr); tune/spaces/tiny.yaml suits the tiny preset",
    )
    p.add_argument("--samples", type=int, default=8, help="trials (times the values of any grid)")
    p.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at once (default: what the node types' maxima fit)"
    )
    p.add_argument(
        "--name",
        default=None,
        help="sweep name (default: <preset>_<space file stem>_<hash of preset, data, space and overrides>); the same "
        "name continues the sweep, with the inputs it was started with",
    )
    p.add_argument("--storage", default="runs/tune", help="folder or URI for sweeps")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random search")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides of every trial, e.g. train.epochs=3")
    return p


def to_argv(args: argparse.Namespace) -> list[str]:
    """The command line that `add_arguments` parses into `args` (to run the same sweep in another process)."""
    argv = ["--preset", args.preset, "--data", args.data, "--samples", str(args.samples),
            "--max-concurrent", str(args.max_concurrent), "--storage", args.storage,
            "--grace-period", str(args.grace_period), "--reduction-factor", str(args.reduction_factor),
            "--seed", str(args.seed)]  # fmt: skip
    if args.space:  # else the packaged default space of the ddetr that runs it
        argv += ["--space", args.space]
    if args.name:
        argv += ["--name", args.name]
    return argv + list(args.overrides)

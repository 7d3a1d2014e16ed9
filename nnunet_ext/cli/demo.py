"""``nnunet-ext demo``: the whole stock pipeline on the built-in dataset (see nnunet_ext/demo.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ext.errors import UserFacingError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_parser(subparsers) -> None:
    from nnunet_ext.demo import DEFAULT_TRAINER, DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo", help="run plan, preprocess, train, predict and evaluate on a built-in synthetic dataset",
        description="Writes a small synthetic abdominal dataset and runs nnU-Net's stock pipeline on it with the "
                    "given trainer (plan + preprocess, train fold 0, predict the held-out cases, evaluate). Prints "
                    "a Dice table and writes a figure. Uses the GPU if there is one. Never touches your own "
                    "nnU-Net folders.")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, help=f"trainer class name (default {DEFAULT_TRAINER})")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs,
                        help=f"training epochs (default {defaults.epochs})")
    parser.add_argument("--iters", type=positive_int, default=defaults.iterations,
                        help=f"training iterations per epoch (default {defaults.iterations})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="[OPTIONAL] folder for the demo's nnU-Net folders and outputs; must be new, empty or "
                             "a previous demo's. Default: a new temporary folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.demo import DemoSettings, run_demo

    if args.workdir is not None and str(args.workdir).strip() == "":
        raise UserFacingError("--workdir is empty")
    run_demo(DemoSettings(trainer=args.trainer, epochs=args.epochs, iterations=args.iters, workdir=args.workdir))
    return 0

"""Entry point of ``nnunet-ext``. Subcommands import their heavy dependencies only when they run."""
from __future__ import annotations

import argparse
import sys

from nnunet_ext import __version__
from nnunet_ext.cli import convert, demo, doctor, env, list_command, plan, submit
from nnunet_ext.cli import preprocess_unlabeled
from nnunet_ext.cli import merge, predict
from nnunet_ext.cli import slurm
from nnunet_ext.cli import import_weights
from nnunet_ext.cli import challenge_infer, container
from nnunet_ext.errors import UserFacingError

SUBCOMMANDS = (list_command, doctor, env, demo, plan, convert, submit, preprocess_unlabeled, merge, predict, slurm,
               import_weights, container, challenge_infer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-ext",
        description="Published segmentation methods as nnU-Net v2 plug-ins. Train and predict with the stock "
                    "nnUNetv2_* commands (e.g. nnUNetv2_train 17 3d_fullres 0 -tr <Trainer>); this tool lists "
                    "what is available, checks your set-up, runs a demo and runs our planners.")
    parser.add_argument("--version", action="version", version=f"nnunet-ext {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except UserFacingError as error:
        print(f"nnunet-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

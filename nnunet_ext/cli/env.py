"""``nnunet-ext env``: the explicit alternative to the start-up hook.

``eval "$(nnunet-ext env)"`` exports ``nnUNet_extTrainer`` with our discovery folder appended to
whatever is already set, for shells where the hook is switched off or site-packages' .pth files
are not read (e.g. ``python -S``, some cluster module systems).
"""
from __future__ import annotations

import argparse
import os
import shlex

from nnunet_ext._startup import EXT_TRAINER_VARIABLE, search_path_with_discovery_folder


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("env", help="print the shell line that makes nnU-Net find our trainers",
                                   description='Prints an export line for nnUNet_extTrainer. Use: '
                                               'eval "$(nnunet-ext env)". Your existing value is kept.')
    parser.set_defaults(run=run)


def export_line(environ=os.environ) -> str:
    value = search_path_with_discovery_folder(environ.get(EXT_TRAINER_VARIABLE))
    return f"export {EXT_TRAINER_VARIABLE}={shlex.quote(value)}"


def run(args: argparse.Namespace) -> int:
    print(export_line())
    return 0

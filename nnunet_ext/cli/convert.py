"""``nnunet-ext convert``: a challenge's official release -> an nnU-Net v2 raw dataset.

One sub-command per challenge of :mod:`nnunet_ext.challenges.registry` (each with its own
options, converted by the challenge's module). The work is streamed case by case,
resumable (run it again to complete or verify) and parallel; the source is only read. Exit status:
0 when every case is in the dataset, 1 when a case failed (the summary says which and why), 2 for
bad input (wrong layout, dataset id taken, ...), 130 when interrupted (run it again to finish).
"""
from __future__ import annotations

import argparse
import os

from nnunet_ext.errors import UserFacingError

EPILOG = ("Run the same command again to complete an interrupted conversion or verify a finished one. "
          "Then: nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the release folder (see the description); only read")
    parser.add_argument("-d", type=int, required=True, metavar="ID", dest="dataset_id",
                        help="nnU-Net dataset id (1..999) for $nnUNet_raw/DatasetXXX_NAME")
    parser.add_argument("--name", default=None, help="dataset name (default: see the description)")
    parser.add_argument("-np", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)), dest="num_processes",
                        help="[OPTIONAL] cases converted in parallel (default: half the CPU cores, at most 8)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--copy", action="store_const", const="copy", dest="mode",
                      help="copy the files (default; the dataset stands alone)")
    mode.add_argument("--link", action="store_const", const="link", dest="mode",
                      help="symlink the files to the release instead (no extra disk; keep the release in place)")
    parser.set_defaults(run=run, mode="copy")


def add_parser(subparsers) -> None:
    from nnunet_ext.challenges import registry

    parser = subparsers.add_parser(
        "convert", help="a challenge release (" + ", ".join(e.title for e in registry.CHALLENGES) + ") -> an nnU-Net "
                        "raw dataset",
        description="Converts a challenge's official release layout into $nnUNet_raw/DatasetXXX_NAME (imagesTr, "
                    "labelsTr, imagesVa/imagesTs, dataset.json): case by case, resumable, in parallel. Every file of "
                    "a case is decoded in full and checked before the case is written (truncated or unreadable "
                    "files, dimension, grid of channels and label, label values, NaN/Inf); a case that fails is "
                    "reported and left out, never resampled. Ctrl-C leaves only complete cases; run it again to "
                    "finish.",
        epilog=EPILOG)
    challenges = parser.add_subparsers(dest="challenge", metavar="CHALLENGE", required=True)
    for entry in registry.CHALLENGES:
        sub = challenges.add_parser(entry.name, help=f"{entry.title}: {entry.release}",
                                    description=entry.convert_description, epilog=EPILOG)
        _common_arguments(sub)
        for option in entry.convert_options:
            if option.switch:
                sub.add_argument(option.flag, action="store_true", help=option.help)
            else:
                sub.add_argument(option.flag, choices=option.choices, default=option.default,
                                 required=option.required, help=option.help)


def _options(args: argparse.Namespace) -> dict:
    from nnunet_ext.challenges import registry

    entry = registry.get(args.challenge)
    names = [option.flag.lstrip("-").replace("-", "_") for option in entry.convert_options]
    return {name: getattr(args, name) for name in names}


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.challenges import registry
    from nnunet_ext.challenges.common import run_conversion
    from nnunet_ext.setup_checks import require_path_variables

    require_path_variables(("nnUNet_raw",))
    if args.num_processes < 1:
        raise UserFacingError(f"-np must be at least 1, got {args.num_processes}.")
    if not os.path.isdir(args.src):
        raise UserFacingError(f"SRC {args.src} is not a folder.")
    plan, default_name = registry.load(registry.get(args.challenge).converter)(args.src, _options(args))
    try:
        summary = run_conversion(plan, os.environ["nnUNet_raw"], args.dataset_id,
                                 default_name if args.name is None else args.name,
                                 args.num_processes, args.mode)
    except OSError as error:  # unwritable nnUNet_raw, full disk while writing dataset.json, ...
        raise UserFacingError(f"could not write the dataset: {error.strerror or error} "
                              f"({error.filename or os.environ['nnUNet_raw']}). Free space or fix the permissions "
                              f"and run the same command again; complete cases are kept.") from None
    print(summary.format())
    if summary.failed:
        print(f"{len(summary.failed)} case(s) failed and are not in the dataset; fix them (or leave them out) and run "
              f"the same command again.")
        return 1
    print(f"Next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity")
    return 0

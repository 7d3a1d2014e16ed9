"""``nnunet-ext preprocess-unlabeled``: preprocess a dataset's imagesUnlabeled with its own plans.

See ``nnunet_ext/unlabeled/preprocess.py`` for what is done and ``nnunet_ext/unlabeled/convention.py``
for the folder convention. The labelled data must be planned and preprocessed first (stock
``nnUNetv2_plan_and_preprocess``); nothing of it is changed. Every image is checked before anything is
written; the command is safe to interrupt and to rerun, and concurrent runs on one dataset take turns.
"""
from __future__ import annotations

import argparse
import os

from nnunet_ext.errors import UserFacingError
from nnunet_ext.setup_checks import require_path_variables


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess-unlabeled", help="preprocess imagesUnlabeled with the dataset's plans (semi-supervised methods)",
        description="Preprocesses the unlabelled images in nnUNet_raw/DatasetXXX_Name/imagesUnlabeled (named and "
                    "channelled like imagesTr) with the dataset's own plans and nnU-Net's preprocessor: same "
                    "resampling, normalisation and cropping as the labelled cases. Writes nnUNet_preprocessed/"
                    "DatasetXXX_Name/<data_identifier>_unlabeled/ and a manifest next to it; the labelled data is "
                    "not touched. Every image is decoded and checked first (truncated files, 2D/3D, channel "
                    "geometry, NaN/Inf); nothing is written if one is bad. Resumable: a rerun only does what is "
                    "missing, damaged, changed or made with other plans. A second run on the same dataset waits "
                    "for the first.")
    parser.add_argument("-d", required=True, metavar="ID", help="dataset id or name (e.g. 17 or Dataset017_X)")
    parser.add_argument("-c", nargs="+", required=True, metavar="CONFIG",
                        help="configuration(s) to preprocess for, e.g. 3d_fullres (must be preprocessed already)")
    parser.add_argument("-p", default="nnUNetPlans", metavar="PLANS",
                        help="[OPTIONAL] plans identifier, as nnUNetv2_train -p. Default: nnUNetPlans")
    parser.add_argument("-np", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="[OPTIONAL] worker processes (spawned, as nnU-Net's preprocessing; the output is the "
                             "same for any number; a progress bar shows on a terminal). Default: half the CPU "
                             "cores, at most 8")
    parser.add_argument("--overwrite", action="store_true",
                        help="[OPTIONAL] redo every case, also those already preprocessed with the same plans")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.unlabeled.preprocess import preprocess_unlabeled

    require_path_variables(("nnUNet_raw", "nnUNet_preprocessed"))
    for option, values in (("-d", [args.d]), ("-c", args.c), ("-p", [args.p])):
        for value in values:
            check_plain_name(option, value)
    dataset = int(args.d) if str(args.d).isdigit() else args.d
    results = preprocess_unlabeled(dataset, args.c, args.p, num_processes=max(1, args.np), overwrite=args.overwrite)
    for result in results:
        print(f"{result.configuration}: {len(result.cases)} unlabelled case(s) in {result.folder} "
              f"({len(result.processed)} preprocessed now); manifest {result.manifest}")
    print("Train a semi-supervised trainer as usual, e.g. "
          f"nnUNetv2_train {args.d} {args.c[0]} 0 -p {args.p} -tr <SemiSupervisedTrainer>")
    return 0


def check_plain_name(option: str, value: str) -> None:
    """Refuse a dataset, configuration or plans name that is a path or holds control characters (it becomes
    part of folder and file names)."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or not value.isprintable():
        raise UserFacingError(f"{option} {ascii(value)} is not a name: it may not be empty, contain '/' or '\\' or "
                              f"control characters such as newlines. Give the dataset id or name, configuration or "
                              f"plans identifier as nnU-Net shows them (e.g. -d 17 -c 3d_fullres -p nnUNetPlans).")

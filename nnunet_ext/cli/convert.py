"""``nnunet-ext convert``: a challenge's official release -> an nnU-Net v2 raw dataset.

One sub-command per challenge (each has its own options). The work is streamed case by case,
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
    parser = subparsers.add_parser(
        "convert", help="a challenge release (KiTS21, AMOS22, SegRap2023) -> an nnU-Net raw dataset",
        description="Converts a challenge's official release layout into $nnUNet_raw/DatasetXXX_NAME (imagesTr, "
                    "labelsTr, imagesTs, dataset.json): case by case, resumable, in parallel. Every file of a case "
                    "is decoded in full and checked before the case is written (truncated or unreadable files, "
                    "dimension, grid of channels and label, label values, NaN/Inf); a case that fails is reported "
                    "and left out, never resampled. Ctrl-C leaves only complete cases; run it again to finish.",
        epilog=EPILOG)
    challenges = parser.add_subparsers(dest="challenge", metavar="CHALLENGE", required=True)
    kits = challenges.add_parser(
        "kits21", help="KiTS21: SRC = kits21/data (case_XXXXX/imaging.nii.gz, aggregated_MAJ_seg.nii.gz)",
        description="SRC is the KiTS21 release's data/ folder of case_XXXXX/ folders with imaging.nii.gz and "
                    "aggregated_MAJ_seg.nii.gz. Writes a region-based dataset (kidney+masses, masses, tumor; "
                    "regions_class_order 1,3,2). Cases without a segmentation go to imagesTs. Default name KiTS21.",
        epilog=EPILOG)
    _common_arguments(kits)
    amos = challenges.add_parser(
        "amos22", help="AMOS22: SRC = amos22/ (dataset.json, imagesTr, labelsTr, imagesVa, labelsVa, imagesTs)",
        description="SRC is the unpacked AMOS22 release with its dataset.json. Task 1: CT cases (ids <= 500); task "
                    "2: CT and MRI. Labels from the release's dataset.json. Validation cases go to imagesTs/labelsTs "
                    "unless --include-validation. Default name AMOS22Task1 / AMOS22Task2.",
        epilog=EPILOG)
    _common_arguments(amos)
    amos.add_argument("--task", choices=("1", "2", "mri"), default="2",
                      help="1: CT only; 2: CT and MRI (default); mri: MRI only (merge with task 1 for a CT + MRI "
                           "universal dataset)")
    amos.add_argument("--include-validation", action="store_true",
                      help="train on the validation cases too (needs labelsVa)")
    segrap = challenges.add_parser(
        "segrap2023", help="SegRap2023: SRC holds SegRap2023_Training_Set_120cases and its _OneHot_Labels",
        description="SRC holds SegRap2023_Training_Set_120cases/segrap_XXXX/{image,image_contrast}.nii.gz and "
                    "SegRap2023_Training_Set_120cases_OneHot_Labels/Task001|Task002/. Channels: 0 non-contrast CT, "
                    "1 contrast CT. --task oar: the 45 OARs as the organisers' 54 disjoint classes; --task gtv: "
                    "GTVp, GTVnd. One dataset per task. Default name SegRap2023OAR / SegRap2023GTV.",
        epilog=EPILOG)
    _common_arguments(segrap)
    segrap.add_argument("--task", choices=("oar", "gtv"), required=True, help="oar (task 1) or gtv (task 2)")


def _plan(args: argparse.Namespace):
    from nnunet_ext.challenges import amos22, kits21, segrap2023

    if args.challenge == "kits21":
        return kits21.plan(args.src), kits21.DEFAULT_NAME
    if args.challenge == "amos22":
        task = amos22.parse_task(args.task)
        return amos22.plan(args.src, task, args.include_validation), amos22.default_name(task)
    return segrap2023.plan(args.src, args.task), segrap2023.default_name(args.task)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.challenges.common import run_conversion
    from nnunet_ext.setup_checks import require_path_variables

    require_path_variables(("nnUNet_raw",))
    if args.num_processes < 1:
        raise UserFacingError(f"-np must be at least 1, got {args.num_processes}.")
    if not os.path.isdir(args.src):
        raise UserFacingError(f"SRC {args.src} is not a folder.")
    plan, default_name = _plan(args)
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

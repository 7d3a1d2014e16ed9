"""``nnunet-ext submit``: nnU-Net predictions -> what a challenge's leaderboard takes, validated before upload.

``submit CHALLENGE [--task T] [--phase P] PRED_DIR OUT --images IMAGES`` writes the challenge's files
(a folder, or for AMOS22 one zip) and checks them against the images; ``submit CHALLENGE --check-only
SUBMISSION --images IMAGES`` only checks a folder or zip, built by us or by hand. The formats come from
:mod:`nnunet_ext.challenges.registry`. Exit status 0 when the submission is valid, 1 when it is not
(the report lists each problem; when exporting, nothing is written then), 2 for bad input. OUT is
built beside itself and put in place whole.
"""
from __future__ import annotations

import argparse

from nnunet_ext.cli.options import add_task_argument, challenge_parsers
from nnunet_ext.errors import UserFacingError


def _arguments(parser: argparse.ArgumentParser, tasks: tuple[str, ...], phases: tuple[str, ...]) -> None:
    parser.add_argument("folder", metavar="PRED_DIR",
                        help="nnU-Net's prediction folder (<case>.nii.gz); with --check-only, the submission")
    parser.add_argument("out", metavar="OUT", nargs="?", default=None,
                        help="where to write the submission (a folder, or a .zip where the challenge takes one); "
                             "not with --check-only")
    parser.add_argument("--images", metavar="IMAGES_DIR", default=None,
                        help="the images predicted (nnU-Net's imagesVa/imagesTs with <case>_0000.nii.gz, or the "
                             "release's folder): checks that every case of the task is there, no other, each on its "
                             "image's grid. Required for a zip")
    parser.add_argument("--check-only", action="store_true",
                        help="only validate PRED_DIR as a submission (folder or zip); write nothing")
    add_task_argument(parser, tasks)
    parser.add_argument("--phase", choices=phases, default=phases[0],
                        help=f"the leaderboard phase (default {phases[0]})")
    parser.set_defaults(run=run)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    commands = challenge_parsers(
        subparsers, "submit", help="nnU-Net predictions -> challenge submission ({challenges}), validated",
        description="Writes each prediction in the challenge's naming, label values, data type and file format, then "
                    "validates the submission (missing or extra cases, grid, label values, dtype). KiTS21 (local): "
                    "case_XXXXX.nii.gz uint8 0-3, the folder the organisers' evaluation reads. AMOS22 (validation, "
                    "test): one zip with results/amos_XXXX.nii.gz uint8 0-15, one per image of the task. SegRap2023 "
                    "(local): segrap_XXXX.mha, a 4D uint8 stack of binary masks (45 OARs or GTVp, GTVnd) as the "
                    "challenge's containers write them. Leaderboards that run containers: nnunet-ext container.",
        help_each="submission")
    for entry, sub in commands:
        _arguments(sub, entry.tasks, entry.phases)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.challenges import registry
    from nnunet_ext.challenges.submission import export_submission, validate_submission

    fmt = registry.submission_format(args.challenge, getattr(args, "task", None), args.phase)
    if args.check_only:
        if args.out is not None:
            raise UserFacingError("--check-only validates one submission; give only it (and --images).")
        report = validate_submission(fmt, args.folder, args.images)
    else:
        if args.out is None:
            raise UserFacingError("give PRED_DIR and OUT (or --check-only SUBMISSION to validate one).")
        try:
            report = export_submission(fmt, args.folder, args.out, args.images)
        except OSError as error:  # unwritable OUT, full disk: the staged files were discarded
            raise UserFacingError(f"could not write the submission: {error.strerror or error} "
                                  f"({error.filename or args.out}); OUT was left as it was. Free space or fix the "
                                  f"permissions and run again.") from None
    print(report.format(fmt.title))
    return 0 if report.ok else 1

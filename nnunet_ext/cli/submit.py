"""``nnunet-ext submit``: nnU-Net predictions -> a challenge submission folder, validated before upload.

``submit CHALLENGE PRED_DIR OUT [--images TEST_IMAGES]`` writes the challenge's files and checks
them; ``submit CHALLENGE --check-only SUBMISSION --images TEST_IMAGES`` only checks a folder. Exit
status 0 when the folder is valid, 1 when it is not (the report lists each problem; when exporting,
nothing is written then), 2 for bad input. OUT is built beside itself and put in place whole.
"""
from __future__ import annotations

import argparse

from nnunet_ext.errors import UserFacingError


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="PRED_DIR",
                        help="nnU-Net's prediction folder (<case>.nii.gz); with --check-only, the submission folder")
    parser.add_argument("out", metavar="OUT", nargs="?", default=None,
                        help="folder to write the submission into (not with --check-only)")
    parser.add_argument("--images", metavar="TEST_IMAGES_DIR", default=None,
                        help="the test images (nnU-Net imagesTs with <case>_0000.nii.gz, or the release's test "
                             "layout): checks that every case is there and on the image's grid. Recommended")
    parser.add_argument("--check-only", action="store_true",
                        help="only validate the folder PRED_DIR as a submission; write nothing")
    parser.set_defaults(run=run)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit", help="nnU-Net predictions -> challenge submission files (KiTS21, AMOS22, SegRap2023), validated",
        description="Writes each prediction in the challenge's naming, label values, data type and file format, then "
                    "validates the folder (missing cases, grid, label values, dtype). KiTS21: case_XXXXX.nii.gz uint8 "
                    "0-3. AMOS22: amos_XXXX.nii.gz uint8 0-15. SegRap2023: segrap_XXXX.mha, a 4D uint8 stack of "
                    "binary masks (45 OARs or GTVp, GTVnd) as the challenge's containers wrote them.")
    challenges = parser.add_subparsers(dest="challenge", metavar="CHALLENGE", required=True)
    for name, text in (("kits21", "KiTS21"), ("amos22", "AMOS22")):
        _arguments(challenges.add_parser(name, help=f"{text} submission"))
    segrap = challenges.add_parser("segrap2023", help="SegRap2023 submission (per task)")
    _arguments(segrap)
    segrap.add_argument("--task", choices=("oar", "gtv"), required=True, help="oar (task 1) or gtv (task 2)")


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.challenges.submission import export_submission, submission_format, validate_submission

    fmt = submission_format(args.challenge, getattr(args, "task", None))
    if args.check_only:
        if args.out is not None:
            raise UserFacingError("--check-only validates one folder; give only the submission folder (and --images).")
        report = validate_submission(fmt, args.folder, args.images)
    else:
        if args.out is None:
            raise UserFacingError("give PRED_DIR and OUT (or --check-only SUBMISSION to validate a folder).")
        try:
            report = export_submission(fmt, args.folder, args.out, args.images)
        except OSError as error:  # unwritable OUT, full disk: the staged folder was discarded
            raise UserFacingError(f"could not write the submission: {error.strerror or error} "
                                  f"({error.filename or args.out}); OUT was left as it was. Free space or fix the "
                                  f"permissions and run again.") from None
    print(report.format(fmt.title))
    return 0 if report.ok else 1

"""``nnunet-ext challenge-infer``: the entry point of a challenge's algorithm container (also runs without one).

Reads the challenge's container inputs below ``--input`` (arbitrary file names, the folders and file
type its interface names), predicts with nnU-Net's predictor as ``nnUNetv2_predict`` does, and writes
equally named outputs in the interface's folder and format below ``--output``
(:mod:`nnunet_ext.challenges.infer`). The model is found as ``nnUNetv2_predict`` finds it (``-d -c -tr
-p`` below ``nnUNet_results``) or given with ``-m``. Exit status 0 when every output was written, 2 for
bad input (nothing written).
"""
from __future__ import annotations

import argparse

from nnunet_ext.cli.options import add_model_arguments, add_task_argument, challenge_parsers, parse_folds


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    commands = challenge_parsers(
        subparsers, "challenge-infer", help="a challenge container's inference: /input/... -> /output/... "
                                            "({challenges})",
        description="Predicts every case below --input in the challenge's container layout (e.g. KiTS21: "
                    "images/ct/<uuid>.mha; SegRap2023: images/head-neck-ct/ and images/head-neck-contrast-enhanced-"
                    "ct/<uuid>.mha; AMOS22: <name>.nii.gz) with nnU-Net's predictor and writes each output under the "
                    "input's name in the challenge's output folder and format below --output. GPU when present "
                    "(-device auto), CPU otherwise.",
        help_each="container inference")
    for entry, sub in commands:
        add_task_argument(sub, entry.tasks)
        sub.add_argument("--input", default="/input", help="the input root (default /input)")
        sub.add_argument("--output", default="/output", help="the output root (default /output)")
        model = sub.add_mutually_exclusive_group(required=True)
        model.add_argument("-d", dest="dataset", help="dataset name or id below nnUNet_results (with -c, -tr, -p)")
        model.add_argument("-m", dest="model_folder", help="the trained model folder itself")
        add_model_arguments(sub, folds_default=None,
                            folds_help="folds (default: every fold_N with the checkpoint, as nnUNetv2_predict)")
        sub.add_argument("-device", default="auto", choices=("auto", "cuda", "cpu", "mps"),
                         help="auto (default): cuda when a GPU is visible, else cpu")
        sub.add_argument("--disable_tta", action="store_true", help="no mirroring at test time (faster)")
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnunet_ext.challenges import infer

    if args.model_folder is not None:
        model_folder = Path(args.model_folder)
    else:
        model_folder = infer.model_folder_of(args.dataset, args.trainer, args.plans, args.configuration)
    written = infer.challenge_infer(args.challenge, getattr(args, "task", None), args.input, args.output,
                                    model_folder, parse_folds(args.folds), args.checkpoint, args.device,
                                    not args.disable_tta)
    print(f"Wrote {len(written)} output(s).")
    return 0

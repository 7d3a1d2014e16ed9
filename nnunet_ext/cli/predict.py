"""``nnunet-ext predict --task NAME``: nnUNetv2_predict for models trained on a merged dataset.

Takes nnUNetv2_predict's flags; the model is found from -d/-tr/-p/-c (or -m MODEL_FOLDER), the
input images need only the task's own channels, and the labels are written in the task's own
values (see :mod:`nnunet_ext.tasks.predict`).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="nnUNetv2_predict for one task of a model trained on a merged (multi-task) dataset",
        description="Predicts every case in -i as task --task with nnU-Net's predictor and writes the labels in "
                    "that task's own (source dataset's) label values. Flags as nnUNetv2_predict.")
    parser.add_argument("--task", required=True, help="task name (see the model's dataset.json 'tasks')")
    parser.add_argument("-i", required=True, help="input folder (CASE_XXXX.nii.gz with the task's channels)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-m", default=None, help="[OPTIONAL] trained model folder (instead of -d/-tr/-p/-c)")
    parser.add_argument("-d", default=None, help="dataset name or id of the merged dataset")
    parser.add_argument("-c", default="3d_fullres", help="configuration. Default: 3d_fullres")
    parser.add_argument("-tr", default="nnUNetUniversalTrainer", help="trainer. Default: nnUNetUniversalTrainer")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("-f", nargs="+", default=None,
                        help="folds (or 'all'). Default: every fold the model folder has")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (fraction of the patch)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="Default: cuda")
    parser.add_argument("-npp", type=int, default=3, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=3, help="segmentation export processes")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nnunet_ext import compat
    from nnunet_ext.errors import UserFacingError
    from nnunet_ext.setup_checks import require_path_variables
    from nnunet_ext.tasks.predict import predict_task

    if args.m is None:
        if args.d is None:
            raise UserFacingError("Give the model with -d DATASET (plus -tr/-p/-c) or -m MODEL_FOLDER.")
        require_path_variables(("nnUNet_results",))
        model_folder = compat.trained_model_folder(args.d, args.tr, args.p, args.c)
    else:
        model_folder = args.m
    folds = None if args.f is None else tuple(f if f == "all" else int(f) for f in args.f)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("-device cuda but no CUDA GPU is visible; use -device cpu.")
    cases = predict_task(model_folder, args.i, args.o, args.task, folds, args.chk, args.step_size,
                         not args.disable_tta, torch.device(args.device), args.npp, args.nps)
    print(f"Predicted {len(cases)} case(s) as task {args.task!r} into {args.o} (labels in the task's own values).")
    return 0

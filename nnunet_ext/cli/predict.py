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
    parser.add_argument("-chk", default="checkpoint_final.pth",
                        help="checkpoint file name in each fold folder, e.g. checkpoint_best.pth while training has "
                             "not finished. Default: checkpoint_final.pth")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (fraction of the patch)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="Default: cuda")
    parser.add_argument("-npp", type=int, default=3, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=3, help="segmentation export processes")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nnunet_ext.errors import UserFacingError
    from nnunet_ext.setup_checks import require_path_variables
    from nnunet_ext.tasks.predict import predict_task

    if args.m is None:
        if args.d is None:
            raise UserFacingError("Give the model with -d DATASET (plus -tr/-p/-c) or -m MODEL_FOLDER.")
        require_path_variables(("nnUNet_results",))
        model_folder = _model_folder(args)
    else:
        model_folder = args.m
    folds = _folds(args.f)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("-device cuda but no CUDA GPU is visible; use -device cpu.")
    cases = predict_task(model_folder, args.i, args.o, args.task, folds, args.chk, args.step_size,
                         not args.disable_tta, torch.device(args.device), args.npp, args.nps)
    print(f"Predicted {len(cases)} case(s) as task {args.task!r} into {args.o} (labels in the task's own values).")
    return 0


def _model_folder(args: argparse.Namespace):
    from nnunet_ext import compat
    from nnunet_ext.errors import UserFacingError

    try:
        return compat.trained_model_folder(args.d, args.tr, args.p, args.c)
    except (RuntimeError, ValueError):  # nnU-Net's lookup of the dataset name or id
        raise UserFacingError(f"-d {args.d!r}: nnU-Net knows no such dataset (looked in nnUNet_raw, "
                              f"nnUNet_preprocessed and nnUNet_results). Give the merged dataset's id or name, or "
                              f"the model folder with -m.") from None


def _folds(values: list[str] | None) -> tuple | None:
    from nnunet_ext.errors import UserFacingError

    if values is None:
        return None
    folds: list[int | str] = []
    for value in values:
        if value == "all":
            folds.append(value)
        elif value.isdigit():
            folds.append(int(value))
        else:
            raise UserFacingError(f"-f {value!r}: a fold is a number (0, 1, ...) or 'all'.")
    return tuple(folds)

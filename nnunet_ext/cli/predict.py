"""``nnunet-ext predict --task NAME``: nnUNetv2_predict for models trained on a merged dataset.

Takes nnUNetv2_predict's flags; the model is found from -d/-tr/-p/-c (or -m MODEL_FOLDER), the
input images need only the task's own channels, and the labels are written in the task's own
values (see :mod:`nnunet_ext.tasks.predict`).

``--task all`` (every task) or ``--task A,B`` (also ``--task A --task B``) predicts several tasks in
one pass, the shared encoder run once per window, into ``-o OUT/<task>/``; ``--combine`` adds
``OUT/combined/`` in the merged label space (see :mod:`nnunet_ext.tasks.all_tasks`).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="nnUNetv2_predict for one, several or all tasks of a model trained on a merged (multi-task) "
                        "dataset",
        description="Predicts every case in -i as task --task with nnU-Net's predictor and writes the labels in "
                    "that task's own (source dataset's) label values. With --task all or --task A,B every listed "
                    "task is predicted in one pass (the shared encoder runs once per window) into -o OUT/<task>/, "
                    "the same files a run per task writes. Flags as nnUNetv2_predict.")
    parser.add_argument("--task", required=True, action="append",
                        help="task name (see the model's dataset.json 'tasks'); 'all' for every task, or a comma-"
                             "separated list A,B (or --task A --task B) for several, written to -o OUT/<task>/")
    parser.add_argument("--combine", action="store_true",
                        help="with several tasks: also write OUT/combined/, one map in the merged label space; where "
                             "tasks overlap, the first task in --task order with a foreground label wins")
    parser.add_argument("-i", required=True, help="input folder (CASE_XXXX.nii.gz with the task's channels; "
                                                  "with several tasks, channels that every listed task accepts)")
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
    tasks = [name for value in args.task for name in value.split(",")]
    several = len(tasks) > 1 or tasks == ["all"]
    if args.combine and not several:
        raise UserFacingError(f"--combine merges the label maps of several tasks; give --task all or --task "
                              f"{tasks[0]},OTHER,...")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("-device cuda but no CUDA GPU is visible; use -device cpu.")
    options = (folds, args.chk, args.step_size, not args.disable_tta, torch.device(args.device), args.npp, args.nps)
    if not several:
        cases = predict_task(model_folder, args.i, args.o, tasks[0], *options)
        print(f"Predicted {len(cases)} case(s) as task {tasks[0]!r} into {args.o} (labels in the task's own values).")
        return 0
    from nnunet_ext.tasks.all_tasks import COMBINED, predict_tasks

    names, cases = predict_tasks(model_folder, args.i, args.o, tasks, args.combine, *options)
    combined = f"; {COMBINED}/ in the merged label space" if args.combine else ""
    print(f"Predicted {len(cases)} case(s) as tasks {', '.join(names)} into {args.o}/<task> (labels in each task's "
          f"own values{combined}).")
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

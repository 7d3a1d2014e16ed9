"""``nnunet-ext predict --task NAME``: nnUNetv2_predict for models trained on a merged dataset.

Takes nnUNetv2_predict's flags with its names and defaults (``-num_parts``/``-part_id``,
``--save_probabilities``, ``--continue_prediction``, ``-chk``, ``-npp``/``-nps``, ...); the model is
found from -d/-tr/-p/-c (or -m MODEL_FOLDER), the input images need only the task's own channels,
and the labels (and probabilities) are written in the task's own label space, with the
``dataset.json``, ``plans.json`` and ``predict_from_raw_data_args.json`` nnUNetv2_predict writes (see
:mod:`nnunet_ext.tasks.predict`).

``--task all`` (every task) or ``--task A,B`` (also ``--task A --task B``) predicts several tasks in
one pass, the shared encoder run once per window, into ``-o OUT/<task>/``; ``--combine`` adds
``OUT/combined/`` in the merged label space (see :mod:`nnunet_ext.tasks.all_tasks`).
"""
from __future__ import annotations

import argparse
import os

from nnunet_ext.cli.options import parse_folds


def _default_processes(variable: str) -> int:
    """nnUNetv2_predict's default for -npp/-nps: the variable if it holds a number, else 3."""
    value = os.environ.get(variable, "")
    return int(value) if value.isdigit() else 3


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="nnUNetv2_predict for one, several or all tasks of a model trained on a merged (multi-task) "
                        "dataset",
        description="Predicts every case in -i as task --task with nnU-Net's predictor and writes the labels in "
                    "that task's own (source dataset's) label values. With --task all or --task A,B every listed "
                    "task is predicted in one pass (the shared encoder runs once per window) into -o OUT/<task>/, "
                    "the same files a run per task writes. Flags, names and defaults as nnUNetv2_predict.")
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
                        help="folds (or 'all'). Default: every fold_N the model folder has with the checkpoint "
                             "(nnUNetv2_predict: 0 1 2 3 4, the same for a 5-fold model)")
    parser.add_argument("-chk", default="checkpoint_final.pth",
                        help="checkpoint file name in each fold folder, e.g. checkpoint_best.pth while training has "
                             "not finished. Default: checkpoint_final.pth")
    parser.add_argument("-step_size", type=float, default=0.5,
                        help="sliding-window step (fraction of the patch, at most 1). Default: 0.5")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--verbose", action="store_true", help="nnU-Net's predictor talks more")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write CASE.npz (probabilities of the task's labels, background first, in label-"
                             "value order) and CASE.pkl, as nnUNetv2_predict, for nnUNetv2_ensemble")
    parser.add_argument("--continue_prediction", action="store_true",
                        help="skip cases whose files are already in the output folder (continue an interrupted run)")
    parser.add_argument("-npp", type=int, default=_default_processes("nnUNet_npp"),
                        help="preprocessing processes (0 with -nps 0: everything in one process). Default: "
                             "$nnUNet_npp or 3")
    parser.add_argument("-nps", type=int, default=_default_processes("nnUNet_nps"),
                        help="segmentation export processes. Default: $nnUNet_nps or 3")
    parser.add_argument("-num_parts", type=int, default=1,
                        help="number of separate predict calls sharing the cases (e.g. one per GPU). Default: 1")
    parser.add_argument("-part_id", type=int, default=0,
                        help="which of the -num_parts calls this is, from 0 to num_parts - 1 (same split as "
                             "nnUNetv2_predict). Default: 0")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="Default: cuda")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bars (cluster logs)")
    parser.add_argument("--not_on_device", action="store_true",
                        help="keep the sliding-window accumulation in CPU memory (for cases larger than the GPU's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.errors import UserFacingError
    from nnunet_ext.setup_checks import require_path_variables
    from nnunet_ext.tasks.all_tasks import COMBINED, run_prediction
    from nnunet_ext.tasks.predict import PredictOptions

    if args.m is None:
        if args.d is None:
            raise UserFacingError("Give the model with -d DATASET (plus -tr/-p/-c) or -m MODEL_FOLDER.")
        require_path_variables(("nnUNet_results",))
        model_folder = _model_folder(args)
    else:
        model_folder = args.m
    tasks = [name for value in args.task for name in value.split(",")]
    several = len(tasks) > 1 or tasks == ["all"]
    if args.combine and not several:
        raise UserFacingError(f"--combine merges the label maps of several tasks; give --task all or --task "
                              f"{tasks[0]},OTHER,...")
    options = PredictOptions(
        folds=parse_folds(args.f), checkpoint=args.chk, step_size=args.step_size, use_mirroring=not args.disable_tta,
        device=_device(args.device), num_processes_preprocessing=args.npp, num_processes_export=args.nps,
        save_probabilities=args.save_probabilities, continue_prediction=args.continue_prediction,
        num_parts=args.num_parts, part_id=args.part_id, perform_everything_on_device=not args.not_on_device,
        verbose=args.verbose, allow_tqdm=not args.disable_progress_bar)
    names, predicted, done = run_prediction(model_folder, args.i, args.o, tasks, several, args.combine, options)
    part = f" (part {args.part_id} of {args.num_parts})" if args.num_parts > 1 else ""
    skipped = f"; {len(done)} already there (--continue_prediction)" if done else ""
    if not several:
        print(f"Predicted {len(predicted)} case(s){part} as task {names[0]!r} into {args.o} (labels in the task's "
              f"own values){skipped}.")
        return 0
    combined = f"; {COMBINED}/ in the merged label space" if args.combine else ""
    print(f"Predicted {len(predicted)} case(s){part} as tasks {', '.join(names)} into {args.o}/<task> (labels in each "
          f"task's own values{combined}){skipped}.")
    return 0


def _device(name: str):
    """The torch device, with nnUNetv2_predict's thread settings (all cores on CPU, one thread with CUDA)."""
    import multiprocessing

    import torch

    from nnunet_ext.errors import UserFacingError

    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserFacingError("-device cuda but no CUDA GPU is visible; use -device cpu.")
        torch.set_num_threads(1)
    elif name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    return torch.device(name)


def _model_folder(args: argparse.Namespace):
    from nnunet_ext import compat
    from nnunet_ext.errors import UserFacingError

    try:
        return compat.trained_model_folder(args.d, args.tr, args.p, args.c)
    except (RuntimeError, ValueError):  # nnU-Net's lookup of the dataset name or id
        raise UserFacingError(f"-d {args.d!r}: nnU-Net knows no such dataset (looked in nnUNet_raw, "
                              f"nnUNet_preprocessed and nnUNet_results). Give the merged dataset's id or name, or "
                              f"the model folder with -m.") from None

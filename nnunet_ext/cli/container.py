"""``nnunet-ext container``: the Docker build context of a challenge's algorithm container.

``nnunet-ext container CHALLENGE [--task T] -d ID -c CONFIG -tr TRAINER [-p PLANS] [-f ...] --wheel WHEEL
-o BUILD_DIR`` writes a Dockerfile (official PyTorch CUDA runtime image), the nnunet-ext wheel, the
trained model (or ``--export-zip`` from ``nnUNetv2_export_model_to_zip``) and the entry point
``nnunet-ext challenge-infer`` (:mod:`nnunet_ext.challenges.container`). Exit status 0 when written,
2 for bad input (nothing written).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ext.cli.options import add_model_arguments, add_task_argument, challenge_parsers, parse_folds


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    commands = challenge_parsers(
        subparsers, "container", help="a Docker build context for a challenge's algorithm container ({challenges})",
        description="Writes BUILD_DIR with a Dockerfile on an official PyTorch CUDA runtime image, the nnunet-ext "
                    "wheel, the trained model (its folds' checkpoints, dataset.json, plans.json; or an "
                    "nnUNetv2_export_model_to_zip zip) and the entry point 'nnunet-ext challenge-infer', which reads "
                    "the challenge's /input files (any names) and writes equally named outputs to its /output "
                    "folder. Then: docker build -t NAME BUILD_DIR.",
        help_each="algorithm container")
    for entry, sub in commands:
        add_task_argument(sub, entry.tasks)
        sub.add_argument("-d", dest="dataset", required=True, help="dataset name or id (as for nnUNetv2_predict)")
        add_model_arguments(sub, folds_default=["0", "1", "2", "3", "4"],
                            folds_help="folds to ensemble (default 0 1 2 3 4)")
        sub.add_argument("--wheel", required=True, type=Path,
                         help="the nnunet-ext wheel to install (pip wheel --no-deps -w dist . in its source folder)")
        sub.add_argument("--export-zip", default=None, type=Path,
                         help="take the model from this nnUNetv2_export_model_to_zip zip instead of nnUNet_results")
        sub.add_argument("--base-image", default=None, help="pytorch/pytorch:TAG (default: see the how-to page)")
        sub.add_argument("-o", dest="out", required=True, help="the build context folder to write")
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_ext.challenges import container, infer

    folds = parse_folds(args.folds) or (0, 1, 2, 3, 4)
    model_folder = None
    if args.export_zip is None:
        model_folder = infer.model_folder_of(args.dataset, args.trainer, args.plans, args.configuration)
        dataset = model_folder.parent.name
    else:
        dataset = _dataset_name_in_zip(args.export_zip, args.dataset)
    spec = container.ContainerSpec(args.challenge, getattr(args, "task", None), dataset, args.configuration,
                                   args.trainer, args.plans, folds, args.checkpoint,
                                   args.base_image or container.DEFAULT_BASE_IMAGE)
    container.write_context(spec, args.wheel, args.out, model_folder=model_folder, export_zip=args.export_zip)
    return 0


def _dataset_name_in_zip(path, dataset: str) -> str:
    """``DatasetXXX_NAME`` of ``-d`` (a name, or an id looked up among the zip's top-level folders)."""
    import zipfile

    from nnunet_ext.errors import UserFacingError

    if dataset.startswith("Dataset"):
        return dataset
    if not dataset.isdigit():
        raise UserFacingError(f"-d {dataset!r}: give the dataset id (e.g. 220) or its DatasetXXX_NAME.")
    try:
        with zipfile.ZipFile(path) as archive:
            tops = {name.split("/")[0] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile) as error:
        raise UserFacingError(f"--export-zip {path} cannot be read ({error}); export it again with "
                              f"nnUNetv2_export_model_to_zip.") from None
    matches = sorted(top for top in tops if top.startswith(f"Dataset{int(dataset):03d}_"))
    if len(matches) != 1:
        raise UserFacingError(f"--export-zip {path} holds {len(matches)} dataset folder(s) with id {dataset} "
                              f"({', '.join(matches) or 'none'}); give -d as DatasetXXX_NAME.")
    return matches[0]

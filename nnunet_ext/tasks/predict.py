"""Task-aware prediction: nnU-Net's predictor with the network set to one task, labels exported in
that task's own values.

A model trained on a merged dataset (:mod:`trainers.universal`) needs the task of its input, and
its raw outputs are in the merged label space. For one task this module

1. checks the input folder's cases (``CASE_XXXX<ending>``, the task's channel count, or the merged
   count if already padded) and lays out the padded input nnU-Net expects: links to the user's
   files plus zero images (geometry of channel 0) for the channels the task does not have;
2. runs nnU-Net's own predictor (sliding window, mirroring, fold ensemble, resampling, export)
   with ``set_task`` on the network, which also masks classes the task does not annotate;
3. maps the merged labels to the task's source values (``TaskMap.to_source``) and writes them,
   with the source's geometry, to the output folder, plus a ``dataset.json`` of the task's own
   labels (for ``nnUNetv2_evaluate_folder -djfile``).

The user's input folder is only read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_ext import compat
from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks.task_map import TaskMap

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def cases_in_folder(folder: Path, file_ending: str) -> dict[str, dict[int, Path]]:
    """Case id -> {channel: file} for the nnU-Net-named images in ``folder``."""
    cases: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(file_ending):
            continue
        match = CHANNEL_SUFFIX.match(path.name[: -len(file_ending)])
        if match is None:
            raise UserFacingError(f"{path} is not named CASE_XXXX{file_ending} (XXXX = 4-digit channel index, "
                                  f"e.g. case001_0000{file_ending}); rename it as in nnU-Net's imagesTs.")
        cases[match["case"]][int(match["channel"])] = path
    if not cases:
        raise UserFacingError(f"No images ending in {file_ending} in {folder}; the model's dataset uses "
                              f"{file_ending} files named CASE_XXXX{file_ending}.")
    return dict(cases)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_zero_channel(reference: Path, target: Path) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(reference))
    zeros = sitk.Image(image.GetSize(), image.GetPixelID(), image.GetNumberOfComponentsPerPixel())
    zeros.CopyInformation(image)
    sitk.WriteImage(zeros, str(target))


def prepare_padded_input(input_folder: Path, staging: Path, task_map: TaskMap, task_name: str,
                         file_ending: str) -> list[str]:
    """Write the merged-channel-count input for ``task_name`` into ``staging``; returns the case ids."""
    task = task_map.task(task_name)
    merged = task_map.max_channels
    cases = cases_in_folder(input_folder, file_ending)
    for case, channels in cases.items():
        count = len(channels)
        if sorted(channels) != list(range(count)) or count not in (task.num_channels, merged):
            expected = f"{task.num_channels}" + (f" (or {merged}, already padded)" if merged != task.num_channels else "")
            raise UserFacingError(
                f"Case {case!r} in {input_folder} has channel files {sorted(channels)}; task {task_name!r} needs "
                f"{expected} channels numbered from _0000 ({task.channel_names}). Provide exactly those files.")
        for channel, path in channels.items():
            _link_or_copy(path, staging / f"{case}_{channel:04d}{file_ending}")
        for channel in range(count, merged):
            _write_zero_channel(channels[0], staging / f"{case}_{channel:04d}{file_ending}")
    return sorted(cases)


def export_to_source_labels(task_map: TaskMap, task_name: str, merged_folder: Path, output_folder: Path,
                            cases: Sequence[str], file_ending: str) -> None:
    import SimpleITK as sitk

    for case in cases:
        source = merged_folder / f"{case}{file_ending}"
        if not source.is_file():
            raise RuntimeError(f"nnU-Net's predictor wrote no {source.name} in {merged_folder}")
        image = sitk.ReadImage(str(source))
        values = task_map.to_source(task_name, sitk.GetArrayFromImage(image))
        exported = sitk.GetImageFromArray(values.astype(np.uint8 if values.max(initial=0) < 256 else np.uint16))
        exported.CopyInformation(image)
        target = output_folder / f"{case}{file_ending}"
        partial = output_folder / f".{case}.partial{file_ending}"
        sitk.WriteImage(exported, str(partial), True)
        os.replace(partial, target)


def predict_task(model_folder: str | os.PathLike, input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                 task_name: str, folds: Sequence[int | str] | None = None, checkpoint: str = "checkpoint_final.pth",
                 step_size: float = 0.5, use_mirroring: bool = True, device=None, num_processes_preprocessing: int = 3,
                 num_processes_export: int = 3) -> list[str]:
    """Predict every case in ``input_folder`` as task ``task_name``; returns the case ids written."""
    model_folder, input_folder, output_folder = Path(model_folder), Path(input_folder), Path(output_folder)
    dataset_json_file = model_folder / "dataset.json"
    if not dataset_json_file.is_file():
        raise UserFacingError(f"{model_folder} is not a trained nnU-Net model folder (no dataset.json); pass the "
                              f"folder nnUNetv2_train wrote, or -d/-tr/-p/-c.")
    dataset_json = json.loads(dataset_json_file.read_text())
    task_map = TaskMap.from_dataset_json(dataset_json)
    if task_name not in task_map:
        raise UserFacingError(f"Unknown task {task_name!r}; this model's tasks are {list(task_map.names)}.")
    if not input_folder.is_dir():
        raise UserFacingError(f"Input folder {input_folder} does not exist.")
    if output_folder.resolve() == input_folder.resolve():
        raise UserFacingError("The output folder must differ from the input folder (inputs are never overwritten).")
    file_ending = dataset_json["file_ending"]
    output_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nnunet_ext_predict_", dir=output_folder) as scratch:
        staging, merged = Path(scratch) / "input", Path(scratch) / "merged"
        staging.mkdir()
        cases = prepare_padded_input(input_folder, staging, task_map, task_name, file_ending)
        predictor = compat.predictor(step_size, use_mirroring, device)
        predictor.initialize_from_trained_model_folder(os.fspath(model_folder), folds, checkpoint_name=checkpoint)
        network = getattr(predictor.network, "_orig_mod", predictor.network)
        if not hasattr(network, "set_task"):
            raise UserFacingError(f"The model in {model_folder} is not task-conditioned (trainer "
                                  f"{predictor.trainer_name}); predict it with nnUNetv2_predict.")
        network.set_task(task_map.task_id(task_name))
        predictor.predict_from_files(os.fspath(staging), os.fspath(merged), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes_preprocessing,
                                     num_processes_segmentation_export=num_processes_export)
        export_to_source_labels(task_map, task_name, merged, output_folder, cases, file_ending)
    task = task_map.task(task_name)
    (output_folder / "dataset.json").write_text(json.dumps(
        {"channel_names": task.channel_names, "labels": task.source_labels, "file_ending": file_ending,
         "numTraining": 0, "nnunet_ext_task": {"task": task_name, "source": task.source,
                                               "model": os.fspath(model_folder)}}, indent=2))
    return cases

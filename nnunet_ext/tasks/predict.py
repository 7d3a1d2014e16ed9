"""Task-aware prediction: nnU-Net's predictor with the network set to one task, labels exported in
that task's own values.

A model trained on a merged dataset (:mod:`trainers.universal`) needs the task of its input, and
its raw outputs are in the merged label space. For one task this module

1. checks everything before writing anything: the model folder (its dataset.json and the chosen
   checkpoint in every fold; a missing ``checkpoint_final.pth`` is reported with the checkpoints
   that do exist and the ``-chk`` to use), the input cases (``CASE_XXXX<ending>``, the task's channel
   count, or the merged count if already padded; every file decoded in full with the reader nnU-Net
   uses for the model's dataset, channels on one grid, no NaN/Inf, the model's dimensionality) and
   the output folder (new, empty, or an earlier prediction of the same task; anything else is
   refused untouched);
2. lays out the padded input nnU-Net expects in a private scratch folder: links to the user's files
   plus zero images (geometry of channel 0) for the channels the task does not have;
3. runs nnU-Net's own predictor (sliding window, mirroring, fold ensemble, resampling, export)
   with ``set_task`` on the network, which also masks classes the task does not annotate;
4. maps the merged labels to the task's source values (``TaskMap.to_source``) and writes them,
   with the source's geometry, plus a ``dataset.json`` of the task's own labels (for
   ``nnUNetv2_evaluate_folder -djfile``), through :mod:`nnunet_ext.atomic_io`: a new output folder
   is built in a staging folder and moved into place at the end (Ctrl-C leaves none); into an
   earlier prediction of the same task each file is replaced atomically.

The user's input folder is only read. Concurrent runs into one output folder take turns (lock).
Several tasks in one pass (``--task all`` / ``--task A,B``): :mod:`nnunet_ext.tasks.all_tasks`, which
writes each task's folder with this module's checks and writers.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from nnunet_ext import atomic_io, compat, image_checks
from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks.task_map import TaskMap

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
OUTPUT_KEY = "nnunet_ext_task"  # in the output's dataset.json: marks a folder this command wrote
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


def cases_in_folder(folder: Path, file_ending: str) -> dict[str, dict[int, Path]]:
    """Case id -> {channel: file} for the nnU-Net-named images in ``folder``."""
    cases: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
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


# --- checks (nothing is written) --------------------------------------------------------------------


def read_model_dataset_json(model_folder: Path) -> dict:
    """The model's dataset.json, or a one-line refusal."""
    path = model_folder / "dataset.json"
    if not path.is_file():
        raise UserFacingError(f"{model_folder} is not a trained nnU-Net model folder (no dataset.json); pass the "
                              f"folder nnUNetv2_train wrote, or -d/-tr/-p/-c.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserFacingError(f"{path} cannot be read as JSON ({error}); restore it from the merged raw "
                              f"dataset's dataset.json.") from None
    if not isinstance(content, dict) or not isinstance(content.get("file_ending"), str):
        raise UserFacingError(f"{path} is not an nnU-Net dataset.json (no file_ending); restore it from the "
                              f"merged raw dataset's dataset.json.")
    return content


def _fold_folder(fold: int | str) -> str:
    return f"fold_{fold}"


def _checkpoints_by_fold(model_folder: Path) -> dict[str, list[str]]:
    return {folder.name: sorted(p.name for p in folder.glob("checkpoint*.pth"))
            for folder in sorted(model_folder.glob("fold_*")) if folder.is_dir()}


def _missing_checkpoint_message(model_folder: Path, checkpoint: str, missing: Sequence[str],
                                present: dict[str, list[str]], wanted: Sequence[str]) -> str:
    listing = "; ".join(f"{fold}: {', '.join(names) or 'none'}" for fold, names in present.items()) or \
        "no fold_* folders"
    alternatives = [name for name in ("checkpoint_best.pth", "checkpoint_latest.pth", DEFAULT_CHECKPOINT)
                    if name != checkpoint and wanted and all(name in present.get(f, []) for f in wanted)]
    offer = f"or predict with -chk {alternatives[0]}" if alternatives else \
        "no other checkpoint exists in every fold to fall back to"
    return (f"{model_folder} has no {checkpoint} in {', '.join(missing)} (checkpoints there: {listing}). "
            f"Training has not finished there: finish it with nnUNetv2_train ... --c, {offer}.")


def check_checkpoints(model_folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> tuple:
    """The folds to predict with; refuses a missing or truncated checkpoint in any of them.

    Without ``folds``, nnU-Net's rule: every ``fold_N`` that has the checkpoint.
    """
    if not checkpoint or Path(checkpoint).name != checkpoint:
        raise UserFacingError(f"-chk {checkpoint!r} must be a checkpoint file name such as {DEFAULT_CHECKPOINT} "
                              f"or checkpoint_best.pth, not a path.")
    present = _checkpoints_by_fold(model_folder)
    if folds is None:
        folds = tuple(int(name[len("fold_"):]) for name, names in present.items()
                      if name[len("fold_"):].isdigit() and checkpoint in names)
        if not folds:
            wanted = [name for name in present if name[len("fold_"):].isdigit()]
            raise UserFacingError(_missing_checkpoint_message(model_folder, checkpoint, wanted or ["any fold"],
                                                              present, wanted))
    wanted = [_fold_folder(f) for f in folds]
    missing = [name for name in wanted if checkpoint not in present.get(name, [])]
    if missing:
        raise UserFacingError(_missing_checkpoint_message(model_folder, checkpoint, missing, present, wanted))
    for name in wanted:
        path = model_folder / name / checkpoint
        if path.stat().st_size == 0 or not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            others = [n for n in present[name] if n != checkpoint]
            raise UserFacingError(f"{path} is truncated or not a PyTorch checkpoint ({path.stat().st_size} bytes)"
                                  f"; resume training to rewrite it (nnUNetv2_train ... --c)"
                                  + (f" or predict with -chk {others[0]}." if others else "."))
    return tuple(folds)


def model_spatial_dims(model_folder: Path) -> int | None:
    """2 or 3 from the model's plans.json (the median spacing nnU-Net planned with), None if unknown."""
    try:
        plans = json.loads((model_folder / "plans.json").read_text(encoding="utf-8"))
        spacing = sorted(float(s) for s in plans["original_median_spacing_after_transp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(spacing) != 3:
        return None
    return 2 if image_checks.is_two_d_spacing(spacing) else 3


def check_input_cases(cases: dict[str, dict[int, Path]], input_folder: Path, task_map: TaskMap,
                      task_names: str | Sequence[str], dataset_json: dict, spatial_dims: int | None) -> None:
    """Channel count vs the task (each of several), then every file decoded and checked against its case's
    first channel (once, whatever the number of tasks)."""
    merged = task_map.max_channels
    for task_name in [task_names] if isinstance(task_names, str) else task_names:
        task = task_map.task(task_name)
        for case, channels in cases.items():
            count = len(channels)
            if sorted(channels) != list(range(count)) or count not in (task.num_channels, merged):
                expected = f"{task.num_channels}" + (f" (or {merged}, already padded)" if merged != task.num_channels
                                                     else "")
                raise UserFacingError(
                    f"Case {case!r} in {input_folder} has channel files {sorted(channels)}; task {task_name!r} needs "
                    f"{expected} channels numbered from _0000 ({task.channel_names}). Provide exactly those files.")
    first = next(iter(next(iter(cases.values())).values()))
    reader = image_checks.reader_for(dataset_json, first)
    for case, channels in cases.items():
        image_checks.check_case([channels[c] for c in sorted(channels)], reader, spatial_dims=spatial_dims)


def check_output_folder(output_folder: Path, task_name: str) -> bool:
    """True if ``output_folder`` holds an earlier prediction of this task (its files get replaced), False if
    it is new or empty; anything else is refused untouched."""
    if not output_folder.exists() and not output_folder.is_symlink():
        return False
    if not output_folder.is_dir():
        raise UserFacingError(f"Output {output_folder} exists and is not a folder; give a new or empty folder "
                              f"with -o.")
    entries = [p for p in output_folder.iterdir() if not atomic_io.is_temporary(p)]
    if not entries:
        return False
    try:
        stored = json.loads((output_folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict) or not isinstance(stored.get(OUTPUT_KEY), dict):
        example = sorted(p.name for p in entries)[0]
        if any(_holds_our_prediction(p) for p in entries):
            raise UserFacingError(f"Output folder {output_folder} holds predictions of several tasks, one subfolder "
                                  f"each (e.g. {example!r}); nothing was changed. Predict one task into its "
                                  f"subfolder (-o {output_folder / example}) or give a new or empty folder with -o.")
        raise UserFacingError(f"Output folder {output_folder} already holds files not written by 'nnunet-ext "
                              f"predict' (e.g. {example!r}); nothing was changed. Give a new or empty folder "
                              f"with -o.")
    earlier = stored[OUTPUT_KEY].get("task")
    if earlier != task_name:
        raise UserFacingError(f"Output folder {output_folder} holds predictions of task {earlier!r}, not "
                              f"{task_name!r}; the two label spaces would mix. Nothing was changed. Give another "
                              f"folder with -o.")
    return True


def _holds_our_prediction(folder: Path) -> bool:
    try:
        stored = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and isinstance(stored.get(OUTPUT_KEY), dict)


# --- writing ------------------------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        atomic_io.write_with(target, lambda temporary: shutil.copyfile(source, temporary))


def prepare_padded_input(cases: dict[str, dict[int, Path]], staging: Path, task_map: TaskMap,
                         file_ending: str) -> list[str]:
    """Write the merged-channel-count input into ``staging`` (checked cases); returns the case ids."""
    from nnunet_ext.tasks.merge import write_zero_channel

    merged = task_map.max_channels
    for case, channels in cases.items():
        for channel, path in channels.items():
            _link_or_copy(path, staging / f"{case}_{channel:04d}{file_ending}")
        for channel in range(len(channels), merged):
            write_zero_channel(channels[0], staging / f"{case}_{channel:04d}{file_ending}")
    return sorted(cases)


def export_to_source_labels(task_map: TaskMap, task_name: str, merged_folder: Path, output_folder: Path,
                            cases: Sequence[str], file_ending: str) -> None:
    """Each merged-space prediction -> the task's own label values, same geometry, written atomically."""
    relabel(task_map.to_source_lut(task_name), merged_folder, output_folder, cases, file_ending)


def relabel(lut: np.ndarray, predicted_folder: Path, output_folder: Path, cases: Sequence[str],
            file_ending: str) -> None:
    """Each case's label map in ``predicted_folder`` -> ``lut[value]``, same geometry, written atomically."""
    import SimpleITK as sitk

    for case in cases:
        source = predicted_folder / f"{case}{file_ending}"
        if not source.is_file():
            raise RuntimeError(f"nnU-Net's predictor wrote no {source.name} in {predicted_folder}")
        image = sitk.ReadImage(str(source))
        predicted = sitk.GetArrayFromImage(image)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= len(lut)):
            raise RuntimeError(f"{source} holds values outside 0..{len(lut) - 1}")
        values = lut[predicted]
        exported = sitk.GetImageFromArray(values.astype(np.uint8 if values.max(initial=0) < 256 else np.uint16))
        exported.CopyInformation(image)
        atomic_io.write_with(output_folder / f"{case}{file_ending}",
                             lambda temporary: sitk.WriteImage(exported, str(temporary), True))


@contextlib.contextmanager
def output_target(output_folder: Path, earlier: bool) -> Iterator[Path]:
    """Where the exports go: the earlier prediction's folder itself (files replaced one by one, each
    atomically), or a staging folder that becomes ``output_folder`` when everything is written."""
    if earlier:
        yield output_folder
        return
    with atomic_io.staged_folder(output_folder) as staging:
        yield staging
        if output_folder.is_dir():
            output_folder.rmdir()  # an empty folder made beforehand (checked: only reached when empty)


def output_dataset_json(task_map: TaskMap, task_name: str, file_ending: str, model_folder: Path) -> dict:
    task = task_map.task(task_name)
    return {"channel_names": task.channel_names, "labels": task.source_labels, "file_ending": file_ending,
            "numTraining": 0, OUTPUT_KEY: {"task": task_name, "source": task.source,
                                           "model": os.fspath(model_folder)}}


def task_conditioned_network(predictor, model_folder: Path):
    """The initialised predictor's network (without torch.compile's wrapper), or a refusal if the model
    does not take a task."""
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if not hasattr(network, "set_task"):
        raise UserFacingError(f"The model in {model_folder} is not task-conditioned (trainer "
                              f"{predictor.trainer_name}); predict it with nnUNetv2_predict.")
    return network


def predict_task(model_folder: str | os.PathLike, input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                 task_name: str, folds: Sequence[int | str] | None = None, checkpoint: str = DEFAULT_CHECKPOINT,
                 step_size: float = 0.5, use_mirroring: bool = True, device=None, num_processes_preprocessing: int = 3,
                 num_processes_export: int = 3) -> list[str]:
    """Predict every case in ``input_folder`` as task ``task_name``; returns the case ids written.

    Everything is checked before anything is written (module docstring); ``checkpoint`` goes to
    nnU-Net's predictor as its checkpoint name (``-chk``).
    """
    model_folder, input_folder, output_folder = Path(model_folder), Path(input_folder), Path(output_folder)
    dataset_json = read_model_dataset_json(model_folder)
    task_map = TaskMap.from_dataset_json(dataset_json)
    if task_name not in task_map:
        raise UserFacingError(f"Unknown task {task_name!r}; this model's tasks are {list(task_map.names)}.")
    folds = check_checkpoints(model_folder, folds, checkpoint)
    if not input_folder.is_dir():
        raise UserFacingError(f"Input folder {input_folder} does not exist.")
    if output_folder.resolve() == input_folder.resolve():
        raise UserFacingError("The output folder must differ from the input folder (inputs are never overwritten).")
    file_ending = dataset_json["file_ending"]
    check_output_folder(output_folder, task_name)
    cases = cases_in_folder(input_folder, file_ending)
    check_input_cases(cases, input_folder, task_map, task_name, dataset_json, model_spatial_dims(model_folder))

    with atomic_io.exclusive(output_folder, "nnunet-ext predict"):
        atomic_io.remove_stale_temporaries(output_folder.parent)
        atomic_io.remove_stale_temporaries(output_folder)
        earlier = check_output_folder(output_folder, task_name)  # again: another run may have written it
        with atomic_io.scratch_folder(output_folder) as scratch:
            staging, merged = scratch / "input", scratch / "merged"
            staging.mkdir()
            case_ids = prepare_padded_input(cases, staging, task_map, file_ending)
            predictor = compat.predictor(step_size, use_mirroring, device)
            predictor.initialize_from_trained_model_folder(os.fspath(model_folder), folds, checkpoint_name=checkpoint)
            network = task_conditioned_network(predictor, model_folder)
            network.set_task(task_map.task_id(task_name))
            predictor.predict_from_files(os.fspath(staging), os.fspath(merged), save_probabilities=False,
                                         overwrite=True, num_processes_preprocessing=num_processes_preprocessing,
                                         num_processes_segmentation_export=num_processes_export)
            with output_target(output_folder, earlier) as target:
                export_to_source_labels(task_map, task_name, merged, target, case_ids, file_ending)
                atomic_io.write_json(target / "dataset.json",
                                     output_dataset_json(task_map, task_name, file_ending, model_folder))
    return case_ids

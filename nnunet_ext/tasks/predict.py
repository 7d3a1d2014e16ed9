"""Task-aware prediction: ``nnunet-ext predict --task NAME``, nnUNetv2_predict for one task of a model
trained on a merged dataset, labels exported in that task's own values.

A model trained on a merged dataset (:mod:`trainers.universal`) needs the task of its input, and
its raw outputs are in the merged label space. For one task (several: :mod:`nnunet_ext.tasks.all_tasks`,
which runs the same steps with one block per task) this module

1. checks everything before writing anything: the model folder (its dataset.json, plans.json and the
   chosen checkpoint in every fold; a missing ``checkpoint_final.pth`` is reported with the
   checkpoints that do exist and the ``-chk`` to use), the input cases (``CASE_XXXX<ending>``, the
   task's channel count, or the merged count if already padded; every file decoded in full with the
   reader nnU-Net uses for the model's dataset, channels on one grid, no NaN/Inf, the model's
   dimensionality) and the output folder (new, empty, or an earlier prediction of the same task;
   anything else is refused untouched);
2. selects the cases as ``nnUNetv2_predict`` does: ``-num_parts N -part_id P`` takes every N-th case
   of the sorted case ids from the P-th, and ``--continue_prediction`` skips cases whose files are
   already in the output folder (with ``--save_probabilities`` also their ``.npz`` and ``.pkl``);
3. writes what ``nnUNetv2_predict`` writes first: ``dataset.json`` (the task's own labels, so
   ``nnUNetv2_evaluate_folder -djfile`` and ``nnUNetv2_ensemble`` read the task's label space),
   ``plans.json`` (the model's) and ``predict_from_raw_data_args.json`` (nnU-Net's keys, plus ours
   under ``nnunet_ext_predict``); a new output folder appears with them in one move;
4. lays out the padded input nnU-Net expects in a private scratch folder: links to the user's files
   plus zero images (geometry of channel 0) for the channels the task does not have;
5. runs nnU-Net's predictor (preprocessing, sliding window, mirroring, fold ensemble) on the network's
   logits of the classes the task annotates (:class:`nnunet_ext.tasks.all_tasks.AllTasksNetwork`, the
   others are never chosen), and nnU-Net's export steps (resampling, softmax, argmax, uncropping)
   in its export processes, where each case is written as soon as it is done (:class:`TaskWriter`):
   the labels mapped to the task's source values, with nnU-Net's image writer for the model's plans
   and the case's geometry, and with ``--save_probabilities`` the probabilities of the task's labels
   (background first, in label-value order: nnU-Net's channel order for the task's dataset) as
   nnU-Net's ``.npz`` plus its ``.pkl``.

Every file goes through :mod:`nnunet_ext.atomic_io` (complete or absent). A run killed or interrupted
mid-way leaves the finished cases, each complete; ``--continue_prediction`` then predicts only the rest.
The user's input folder is only read. Runs into one output folder take turns while they check and set
it up (a lock); their cases are then predicted concurrently (``-num_parts`` jobs into one folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nnunet_ext import atomic_io, compat, image_checks
from nnunet_ext.image_io import write_segmentation, write_zero_channel
from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks.task_map import TaskMap

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
OUTPUT_KEY = "nnunet_ext_task"  # in the output's dataset.json: marks a folder this command wrote
ARGS_FILE = "predict_from_raw_data_args.json"  # nnU-Net's record of a prediction's arguments
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


@dataclass(frozen=True)
class PredictOptions:
    """``nnUNetv2_predict``'s options, with its defaults (``-f``: every fold the model folder has)."""

    folds: Sequence[int | str] | None = None  # -f
    checkpoint: str = DEFAULT_CHECKPOINT  # -chk
    step_size: float = 0.5  # -step_size
    use_mirroring: bool = True  # not --disable_tta
    device: Any = None  # -device (a torch.device; None: CPU)
    num_processes_preprocessing: int = 3  # -npp (both 0: everything in this process, as nnU-Net)
    num_processes_export: int = 3  # -nps
    save_probabilities: bool = False  # --save_probabilities
    continue_prediction: bool = False  # --continue_prediction
    num_parts: int = 1  # -num_parts
    part_id: int = 0  # -part_id
    perform_everything_on_device: bool = True  # not --not_on_device
    verbose: bool = False  # --verbose
    allow_tqdm: bool = True  # not --disable_progress_bar

    def check(self) -> None:
        """Refuse option values nnUNetv2_predict would fail on (one line each)."""
        if isinstance(self.num_parts, bool) or not isinstance(self.num_parts, int) or self.num_parts < 1:
            raise UserFacingError(f"-num_parts {self.num_parts!r}: give the number of prediction jobs, 1 or more.")
        if isinstance(self.part_id, bool) or not isinstance(self.part_id, int) or \
                not 0 <= self.part_id < self.num_parts:
            raise UserFacingError(f"-part_id {self.part_id!r} with -num_parts {self.num_parts}: part ids count from "
                                  f"0 to {self.num_parts - 1}, one per job.")
        for flag, value in (("-npp", self.num_processes_preprocessing), ("-nps", self.num_processes_export)):
            if value < 0:
                raise UserFacingError(f"{flag} {value}: a number of processes, 0 or more.")
        if not 0 < self.step_size <= 1:
            raise UserFacingError(f"-step_size {self.step_size}: a fraction of the patch, above 0 and at most 1.")


def select_cases(case_ids: Sequence[str], num_parts: int = 1, part_id: int = 0) -> list[str]:
    """The cases of job ``part_id`` of ``num_parts``: nnUNetv2_predict's split (every ``num_parts``-th of
    the sorted case ids, from the ``part_id``-th)."""
    return sorted(case_ids)[part_id::num_parts]


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


def check_model_plans(model_folder: Path) -> None:
    """The model's plans.json (nnU-Net's predictor needs it; it is copied into the output) or a refusal."""
    path = model_folder / "plans.json"
    try:
        plans = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserFacingError(f"{path} cannot be read ({type(error).__name__}); nnUNetv2_train writes it beside "
                              f"dataset.json: restore it from nnUNet_preprocessed/<dataset>/<plans>.json.") from None
    if not isinstance(plans, dict):
        raise UserFacingError(f"{path} is not an nnU-Net plans file; restore it from "
                              f"nnUNet_preprocessed/<dataset>/<plans>.json.")


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
    if not cases:
        return
    first = next(iter(next(iter(cases.values())).values()))
    reader = image_checks.reader_for(dataset_json, first)
    for channels in cases.values():
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


def prepare_padded_input(cases: dict[str, dict[int, Path]], staging: Path, task_map: TaskMap, file_ending: str,
                         reader_writer=None) -> list[str]:
    """Write the merged-channel-count input into ``staging`` (checked cases): links to the case's files, and
    for the channels it lacks zero images by the merge's rule (:func:`nnunet_ext.image_io.write_zero_channel`,
    with the dataset's ``reader_writer``); returns the case ids."""
    merged = task_map.max_channels
    for case, channels in cases.items():
        for channel, path in channels.items():
            _link_or_copy(path, staging / f"{case}_{channel:04d}{file_ending}")
        for channel in range(len(channels), merged):
            write_zero_channel(channels[0], staging / f"{case}_{channel:04d}{file_ending}", reader_writer)
    return sorted(cases)


def _save_probabilities(probabilities: np.ndarray, temporary: Path) -> None:
    with open(temporary, "wb") as file:  # a file object: numpy would append .npz to a path
        np.savez_compressed(file, probabilities=probabilities)


@dataclass(frozen=True)
class TaskWriter:
    """Writes one task's prediction of a case into ``folder``, from its block of the network's output
    (the merged classes in ``classes``: ``to_source[i]`` is block class ``i``'s value in the task's own
    labels, ``channels[j]`` the block class of the task's ``j``-th label in label-value order).
    Picklable: it runs in nnU-Net's export processes."""

    folder: Path
    to_source: np.ndarray
    channels: tuple[int, ...]
    file_ending: str

    @classmethod
    def for_task(cls, task_map: TaskMap, task_name: str, classes: Sequence[int], folder: Path,
                 file_ending: str) -> "TaskWriter":
        task = task_map.task(task_name)
        ignore = task.to_source.get(task.ignore_value) if task.ignore_value is not None else None
        channels = []
        for value in sorted(set(task.to_source.values()) - {ignore}):
            blocks = [i for i, merged in enumerate(classes) if task.to_source.get(merged) == value]
            if len(blocks) != 1:
                raise RuntimeError(f"task {task_name!r}: label value {value} is output by {len(blocks)} of the "
                                   f"network's classes {list(classes)} for it, not one")
            channels.append(blocks[0])
        return cls(folder, task_map.to_source_lut(task_name)[np.asarray(classes, dtype=np.int64)], tuple(channels),
                   file_ending)

    def write(self, case_id: str, segmentation: np.ndarray, probabilities: np.ndarray | None, properties: dict,
              reader_writer) -> None:
        """Probabilities of the task's labels (renormalised if the block held other classes) as nnU-Net's
        ``.npz`` and ``.pkl``, then the label map in the task's values, each file atomically."""
        if probabilities is not None:
            kept = probabilities[list(self.channels)]
            if len(self.channels) != len(probabilities):
                kept = kept / kept.sum(0, keepdims=True)
            atomic_io.write_with(self.folder / f"{case_id}.npz", lambda temporary: _save_probabilities(kept, temporary))
            compat.save_case_properties(properties, self.folder / f"{case_id}.pkl")
        write_segmentation(self.to_source[segmentation], self.folder / f"{case_id}{self.file_ending}", properties,
                           reader_writer)


@contextlib.contextmanager
def output_target(output_folder: Path, earlier: bool) -> Iterator[Path]:
    """Where the set-up files go: the earlier prediction's folder itself (files replaced one by one, each
    atomically), or a staging folder that becomes ``output_folder`` when everything is written."""
    if earlier:
        yield output_folder
        return
    with atomic_io.staged_folder(output_folder) as staging:
        yield staging
        if output_folder.is_dir():
            output_folder.rmdir()  # an empty folder made beforehand (checked: only reached when empty)


def output_dataset_json(task_map: TaskMap, task_name: str, file_ending: str, model_folder: Path,
                        model_dataset_json: dict | None = None) -> dict:
    """The dataset.json of a task's output folder: the task's own channels and labels (plus the model's
    reader choice, if it overrides nnU-Net's), marked as written by this command."""
    task = task_map.task(task_name)
    reader = (model_dataset_json or {}).get("overwrite_image_reader_writer")
    return {"channel_names": task.channel_names, "labels": task.source_labels, "file_ending": file_ending,
            "numTraining": 0, **({"overwrite_image_reader_writer": reader} if reader else {}),
            OUTPUT_KEY: {"task": task_name, "source": task.source, "model": os.fspath(model_folder)}}


def prediction_arguments(input_folder: Path, output_folder: Path, options: PredictOptions, what: dict) -> dict:
    """``predict_from_raw_data_args.json``: the arguments nnU-Net records for ``predict_from_files``, with
    the model, task(s), folds, checkpoint and predictor settings under ``nnunet_ext_predict``."""
    settings = asdict(options)
    settings["device"] = str(options.device) if options.device is not None else "cpu"
    settings["folds"] = list(options.folds) if options.folds is not None else None
    return {"list_of_lists_or_source_folder": os.fspath(input_folder),
            "output_folder_or_list_of_truncated_output_files": os.fspath(output_folder),
            "save_probabilities": options.save_probabilities, "overwrite": not options.continue_prediction,
            "num_processes_preprocessing": options.num_processes_preprocessing,
            "num_processes_segmentation_export": options.num_processes_export,
            "folder_with_segs_from_prev_stage": None, "num_parts": options.num_parts, "part_id": options.part_id,
            "nnunet_ext_predict": {**what, **settings}}


def write_folder_metadata(folder: Path, dataset_json: dict, model_folder: Path, arguments: dict) -> None:
    """What nnUNetv2_predict writes into its output folder before the cases: dataset.json, plans.json
    (the model's, byte for byte) and predict_from_raw_data_args.json."""
    atomic_io.write_json(folder / "dataset.json", dataset_json)
    atomic_io.write_bytes(folder / "plans.json", (model_folder / "plans.json").read_bytes())
    atomic_io.write_json(folder / ARGS_FILE, arguments)


def task_conditioned_network(predictor, model_folder: Path):
    """The initialised predictor's network (without torch.compile's wrapper), or a refusal if the model
    does not take a task."""
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if not hasattr(network, "set_task"):
        raise UserFacingError(f"The model in {model_folder} is not task-conditioned (trainer "
                              f"{predictor.trainer_name}); predict it with nnUNetv2_predict.")
    return network


def predict_task(model_folder: str | os.PathLike, input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                 task_name: str, **options: Any) -> list[str]:
    """Predict the cases in ``input_folder`` as task ``task_name`` into ``output_folder``; returns the case
    ids predicted (without those ``--continue_prediction`` found done, and only this job's part).

    ``options``: the fields of :class:`PredictOptions` (nnUNetv2_predict's options and defaults).
    Everything is checked before anything is written (module docstring).
    """
    from nnunet_ext.tasks.all_tasks import run_prediction

    _, predicted, _ = run_prediction(model_folder, input_folder, output_folder, [task_name], several=False,
                                     combine=False, options=PredictOptions(**options))
    return predicted

"""Several tasks of a universal model in one prediction: ``nnunet-ext predict --task all`` (or ``A,B``).

A model trained on a merged dataset (UniSeg, DoDNet, TransDoDNet, the universal nnU-Net) shares
most of its compute between tasks: the encoder (and, for DoDNet and TransDoDNet, the decoder). One
run per task repeats it K times. Here every sliding window runs the shared part once and each
requested task's own part (UniSeg: its prompt channel and the decoder; DoDNet/TransDoDNet: the
controller and the dynamic head; universal nnU-Net: only the class mask) on its features:

* :class:`AllTasksNetwork` wraps the model's network; its forward returns the logits of every
  requested task for one window, stacked along the channels, from the network's ``forward_tasks``:
  per task, the merged classes it annotates (background first), each exactly what
  ``set_task(t); network(x)`` returns for it (the masked classes are left out: never chosen);
* :func:`nnunet_ext.compat.predict_stacked_cases` runs nnU-Net's predictor with it (preprocessing,
  sliding window, Gaussian weighting, mirroring, fold average) and nnU-Net's export steps per block
  (resampling, softmax, argmax, uncropping) in its export processes, where :class:`CaseWriter` writes
  each task's files as a single-task run writes them (:class:`nnunet_ext.tasks.predict.TaskWriter`: the
  task's own label values, its probabilities with ``--save_probabilities``) to ``OUT/<task name>/``.

A single-task run (:func:`nnunet_ext.tasks.predict.predict_task`) is this route with one block
(:func:`run_prediction`), so every option works the same for one task, a list or all, and each
``OUT/<task>/`` holds what ``--task <task> -o OUT/<task>`` writes: the same label maps and
probabilities (byte for byte), ``dataset.json`` and ``plans.json``; only the recorded arguments
(``predict_from_raw_data_args.json``) name another folder. The per-task logits are computed by the
same operations on the same shared tensors as ``set_task(t); network(x)`` (tests compare them with
nnU-Net's own route for one task).

``--combine`` adds ``OUT/combined/``: one map in the merged label space (values and names of the
merged dataset's ``labels``) over the requested tasks. Overlap rule: **the first task in the
``--task`` order that labels a voxel as foreground gives it its label** (``--task all``: task-id
order); background only where every task says background. List a tumour task before its organ's
task to keep tumours that lie inside the organ.

Checks and the write path are the single-task run's (:mod:`nnunet_ext.tasks.predict`): everything
checked before anything is written (input cases against every requested task's channel count; an
output folder that is new, empty, or an earlier prediction of this command with one subfolder per
task); a new output folder appears with every subfolder's dataset.json, plans.json and arguments at
once, and each case's files are written (atomically) as soon as it is done.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_ext import atomic_io, compat, image_checks
from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks import predict as single
from nnunet_ext.tasks.label_space import IGNORE
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError

ALL = "all"
COMBINED = "combined"  # OUT/combined: the merged-space map of --combine
COMBINE_RULE = "first task in --task order with a foreground label wins"


# --- the network ------------------------------------------------------------------------------------


def task_outputs(network: nn.Module, x: torch.Tensor, task_ids: Sequence[int]) -> list:
    """``[set_task(t); network(x) for t in task_ids]``, with the shared part of the network run once.

    The network's own ``forward_tasks`` where it has one (UniSeg, DoDNet, TransDoDNet); the universal
    nnU-Net's wrapper conditions only its class mask, so its inner network runs once; any other
    task-conditioned network is run once per task. The task set before the call is restored.
    """
    if hasattr(network, "forward_tasks"):
        return network.forward_tasks(x, task_ids)
    from nnunet_ext.trainers.universal import TaskConditionedNetwork

    previous, was_set = network.task_index.clone(), network.task_is_set
    outputs = []
    try:
        if isinstance(network, TaskConditionedNetwork):
            shared = network.network(x)
            for task_id in task_ids:
                network.set_task(task_id)
                outputs.append([network.mask_unannotated(o) for o in shared] if isinstance(shared, (list, tuple))
                               else network.mask_unannotated(shared))
        else:
            for task_id in task_ids:
                network.set_task(task_id)
                outputs.append(network(x))
    finally:
        if was_set:
            network.set_task(int(previous))
        else:
            network.task_is_set = False
    return outputs


class AllTasksNetwork(nn.Module):
    """The logits of several tasks for one input, stacked along the channels in ``task_ids`` order.

    Block ``i`` holds task ``task_ids[i]``'s logits of the merged classes in ``classes[i]``: with
    ``annotated_only`` (default) background and the classes the task annotates, ascending; otherwise
    every merged class. Leaving out the others changes no label map: the network pushes them
    ``MASK_MARGIN`` below the task's own classes at every voxel, so they never win the argmax, also
    after nnU-Net's averaging (Gaussian-weighted windows, mirrors, folds) and linear resampling, all
    convex combinations that keep them below (``predict_tasks`` stacks every class if the model's plans
    resample logits otherwise). The stacked buffer holds sum(1 + annotated) channels, not K x classes.

    Holds no parameters of its own; ``load_state_dict`` takes the wrapped network's state dicts (nnU-Net's
    predictor loads each fold's weights this way). Inference only: the network must return one tensor
    per task (deep supervision off, as nnU-Net's predictor builds it).
    """

    def __init__(self, network: nn.Module, task_ids: Sequence[int], annotated_only: bool = True):
        super().__init__()
        if not task_ids:
            raise ValueError("AllTasksNetwork needs at least one task")
        self.network = network
        self.task_ids = tuple(int(t) for t in task_ids)
        annotated = network.annotated_classes
        self.classes = [(annotated[t] if annotated_only else torch.ones_like(annotated[t])).nonzero().flatten().tolist()
                        for t in self.task_ids]
        for block, classes in enumerate(self.classes):
            self.register_buffer(f"_block{block}", torch.tensor(classes, dtype=torch.long), persistent=False)

    @property
    def block_channels(self) -> list[int]:
        return [len(classes) for classes in self.classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = task_outputs(self.network, x, self.task_ids)
        if any(isinstance(o, (list, tuple)) for o in outputs):
            raise ValueError("AllTasksNetwork stacks one output per task; switch deep supervision off "
                             "(decoder.deep_supervision = False) as nnU-Net's predictor does")
        return torch.cat([o.index_select(1, getattr(self, f"_block{block}")) for block, o in enumerate(outputs)], 1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


# --- checks (nothing is written) --------------------------------------------------------------------


def resolve_tasks(task_map: TaskMap, requested: Sequence[str], combine: bool = False) -> list[str]:
    """The task names to predict, in order: ``["all"]`` -> every task (task-id order); otherwise the
    given names, each a task of the model, none twice."""
    requested = list(requested)
    listing = f"this model's tasks are {list(task_map.names)} (or --task {ALL})"
    if ALL in requested:
        if len(requested) > 1:
            raise UserFacingError(f"--task {','.join(requested)}: '{ALL}' already means every task; give '{ALL}' "
                                  f"alone or a list of task names.")
        names = list(task_map.names)
    else:
        if any(not name for name in requested):
            raise UserFacingError(f"--task {','.join(requested)!r} has an empty task name (two commas in a row, or "
                                  f"a comma at an end); {listing}.")
        unknown = [name for name in requested if name not in task_map]
        if unknown:
            raise UserFacingError(f"Unknown task{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))} in --task; {listing}.")
        twice = sorted({name for name in requested if requested.count(name) > 1})
        if twice:
            raise UserFacingError(f"--task lists {', '.join(map(repr, twice))} more than once; give each task once.")
        names = requested
    if combine and COMBINED in names:
        raise UserFacingError(f"--combine writes OUT/{COMBINED}, which is also the folder of task {COMBINED!r}; "
                              f"predict that task without --combine, or into another run.")
    return names


def combined_key(task_names: Sequence[str]) -> str:
    """What marks OUT/combined as the combination of exactly these tasks in this order (its 'task')."""
    return f"{COMBINED}:{','.join(task_names)}"


def check_output_folder(output_folder: Path, task_names: Sequence[str], task_map: TaskMap,
                        combine: bool) -> dict[str, bool] | None:
    """None if ``output_folder`` is new or empty (it will be built in a staging folder); otherwise, per
    subfolder to write (each task, ``combined``), whether it holds an earlier prediction of the same
    thing (its files get replaced). Refuses, untouched, a folder holding anything but earlier outputs
    of this command: a single-task prediction, foreign files, another task's predictions in a task's
    subfolder, or a combination of other tasks in ``combined``."""
    if not output_folder.exists() and not output_folder.is_symlink():
        return None
    if not output_folder.is_dir():
        raise UserFacingError(f"Output {output_folder} exists and is not a folder; give a new or empty folder "
                              f"with -o.")
    entries = sorted((p for p in output_folder.iterdir() if not atomic_io.is_temporary(p)), key=lambda p: p.name)
    if not entries:
        return None
    stored = _stored_marker(output_folder / "dataset.json")
    if stored is not None:
        raise UserFacingError(f"Output folder {output_folder} holds a prediction of the single task "
                              f"{stored.get('task')!r}; several tasks are written to one subfolder each. Nothing "
                              f"was changed. Give a new or empty folder with -o.")
    for entry in entries:
        ours = entry.is_dir() and not entry.is_symlink() and (entry.name in task_map or entry.name == COMBINED)
        if not ours:
            raise UserFacingError(f"Output folder {output_folder} already holds files not written by 'nnunet-ext "
                                  f"predict' (e.g. {entry.name!r}); nothing was changed. Give a new or empty "
                                  f"folder with -o.")
        single.check_output_folder(entry, entry.name if entry.name in task_map else _combined_in(entry))
    earlier = {name: single.check_output_folder(output_folder / name, name) for name in task_names}
    if combine:
        earlier[COMBINED] = single.check_output_folder(output_folder / COMBINED, combined_key(task_names))
    return earlier


def _stored_marker(dataset_json: Path) -> dict | None:
    try:
        stored = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    marker = stored.get(single.OUTPUT_KEY) if isinstance(stored, dict) else None
    return marker if isinstance(marker, dict) else None


def _combined_in(folder: Path) -> str:
    """The key of the combination an earlier OUT/combined holds (any key of ours is accepted here)."""
    marker = _stored_marker(folder / "dataset.json") or {}
    task = marker.get("task")
    return task if isinstance(task, str) and task.startswith(f"{COMBINED}:") else f"{COMBINED}:"


# --- writing ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _output_targets(output_folder: Path, names: Sequence[str], earlier: dict[str, bool] | None
                    ) -> Iterator[dict[str, Path]]:
    """Folder per name to write into: subfolders of a staging folder that becomes ``output_folder`` at
    the end (a new or empty output), or, in an earlier output, each subfolder as a single-task run
    treats its output folder."""
    if earlier is None:
        with single.output_target(output_folder, earlier=False) as staging:
            targets = {name: staging / name for name in names}
            for folder in targets.values():
                folder.mkdir()
            yield targets
        return
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(single.output_target(output_folder / name, earlier[name])) for name in names}


def combine_segmentations(segmentations: Sequence[np.ndarray]) -> np.ndarray:
    """Merged-space maps of tasks in priority order -> one map: at each voxel the first non-zero label."""
    combined = np.zeros_like(segmentations[0])
    for segmentation in segmentations:
        combined = np.where(combined == 0, segmentation, combined)
    return combined


def combined_dataset_json(task_map: TaskMap, task_names: Sequence[str], dataset_json: dict,
                          model_folder: Path) -> dict:
    values = {0} | {v for name in task_names for v in task_map.task(name).annotated_values}
    labels = {name: value for name, value in task_map.labels.items() if value in values and name != IGNORE}
    return {"channel_names": dataset_json.get("channel_names", {}), "labels": labels,
            "file_ending": dataset_json["file_ending"], "numTraining": 0,
            single.OUTPUT_KEY: {"task": combined_key(task_names), "tasks": list(task_names), "rule": COMBINE_RULE,
                                "model": os.fspath(model_folder)}}


@dataclass(frozen=True)
class CaseWriter:
    """Writes one predicted case: each task's files (a :class:`~nnunet_ext.tasks.predict.TaskWriter` per
    block, in block order) and, with ``combined``, :func:`combine_segmentations` of the tasks' maps in
    merged values (``merged[b]``: block ``b``'s class index -> merged value) into that folder, last.
    Picklable: nnU-Net's export processes call it (:func:`nnunet_ext.compat.predict_stacked_cases`)."""

    tasks: tuple[single.TaskWriter, ...]
    merged: tuple[np.ndarray, ...]
    combined: Path | None

    def __call__(self, case_id: str, blocks: Sequence[tuple], properties: dict, reader_writer) -> None:
        for task, (segmentation, probabilities) in zip(self.tasks, blocks):
            task.write(case_id, segmentation, probabilities, properties, reader_writer)
        if self.combined is not None:
            values = combine_segmentations([lut[segmentation] for lut, (segmentation, _) in zip(self.merged, blocks)])
            single.write_segmentation(values, self.combined / f"{case_id}{self.tasks[0].file_ending}", properties,
                                      reader_writer)


def case_outputs(folders: dict[str, Path], case_id: str, file_ending: str, save_probabilities: bool) -> list[Path]:
    """Every file a finished case has in the output folders (``--continue_prediction`` skips a case that has
    them all; as nnU-Net, with ``--save_probabilities`` also the ``.npz`` and ``.pkl``)."""
    files = []
    for name, folder in folders.items():
        if save_probabilities and name != COMBINED:
            files += [folder / f"{case_id}.npz", folder / f"{case_id}.pkl"]
        files.append(folder / f"{case_id}{file_ending}")
    return files


def _load_task_map(dataset_json: dict, model_folder: Path, requested: Sequence[str], several: bool,
                   combine: bool) -> tuple[TaskMap, list[str]]:
    if not several:
        task_map = TaskMap.from_dataset_json(dataset_json)
        if requested[0] not in task_map:
            raise UserFacingError(f"Unknown task {requested[0]!r}; this model's tasks are {list(task_map.names)}.")
        return task_map, [requested[0]]
    try:
        task_map = TaskMap.from_dataset_json(dataset_json)
    except TaskMapError as error:
        raise UserFacingError(f"The model in {model_folder} was not trained on a merged multi-task dataset "
                              f"({error}); predict it with nnUNetv2_predict.") from None
    return task_map, resolve_tasks(task_map, requested, combine)


def _check_cases(cases: dict, input_folder: Path, task_map: TaskMap, task_names: list[str], dataset_json: dict,
                 model_folder: Path, several: bool) -> None:
    try:
        single.check_input_cases(cases, input_folder, task_map, task_names, dataset_json,
                                 single.model_spatial_dims(model_folder))
    except UserFacingError as error:
        if not several or "channels numbered from _0000" not in str(error):
            raise
        raise UserFacingError(f"{error} With several tasks every case must suit each of them: list the tasks its "
                              f"channels fit with --task A,B.") from None


def _set_up_output(output_folder: Path, folders: dict[str, Path], several: bool, task_map: TaskMap,
                   task_names: list[str], combine: bool, metadata: dict[str, tuple[dict, dict]],
                   model_folder: Path) -> None:
    """Under the output's lock: check it again (another run may have written it), then write each
    folder's dataset.json, plans.json and arguments; a new output folder appears with them at once."""
    for folder in (output_folder.parent, *folders.values()):
        atomic_io.remove_stale_temporaries(folder)
    if several:
        targets = _output_targets(output_folder, list(folders),
                                  check_output_folder(output_folder, task_names, task_map, combine))
    else:
        targets = _single_target(output_folder, task_names[0])
    with targets as target_of:
        for name in folders:
            dataset_json, arguments = metadata[name]
            single.write_folder_metadata(target_of[name], dataset_json, model_folder, arguments)


@contextlib.contextmanager
def _single_target(output_folder: Path, task_name: str) -> Iterator[dict[str, Path]]:
    earlier = single.check_output_folder(output_folder, task_name)
    with single.output_target(output_folder, earlier) as target:
        yield {task_name: target}


def run_prediction(model_folder: str | os.PathLike, input_folder: str | os.PathLike,
                   output_folder: str | os.PathLike, requested: Sequence[str], several: bool, combine: bool,
                   options: single.PredictOptions) -> tuple[list[str], list[str], list[str]]:
    """The one route of ``nnunet-ext predict --task``: the tasks in ``requested`` (``several``: into
    ``OUT/<task>/``, else ``requested[0]`` into ``OUT``) predicted in one pass; returns (the task names,
    the case ids predicted, the case ids ``--continue_prediction`` found done). Steps: see
    :mod:`nnunet_ext.tasks.predict`."""
    model_folder, input_folder, output_folder = Path(model_folder), Path(input_folder), Path(output_folder)
    options.check()
    dataset_json = single.read_model_dataset_json(model_folder)
    task_map, task_names = _load_task_map(dataset_json, model_folder, requested, several, combine)
    single.check_model_plans(model_folder)
    folds = single.check_checkpoints(model_folder, options.folds, options.checkpoint)
    if not input_folder.is_dir():
        raise UserFacingError(f"Input folder {input_folder} does not exist.")
    if output_folder.resolve() == input_folder.resolve():
        raise UserFacingError("The output folder must differ from the input folder (inputs are never overwritten).")
    file_ending = dataset_json["file_ending"]
    if several:
        check_output_folder(output_folder, task_names, task_map, combine)
        folders = {name: output_folder / name for name in task_names + ([COMBINED] if combine else [])}
    else:
        single.check_output_folder(output_folder, task_names[0])
        folders = {task_names[0]: output_folder}
    cases = single.cases_in_folder(input_folder, file_ending)
    part = single.select_cases(list(cases), options.num_parts, options.part_id)
    done = [case for case in part if options.continue_prediction and all(
        path.is_file() for path in case_outputs(folders, case, file_ending, options.save_probabilities))]
    todo = [case for case in part if case not in done]
    _check_cases({case: cases[case] for case in todo}, input_folder, task_map, task_names, dataset_json,
                 model_folder, several)

    if todo:  # the model is loaded before anything is written: a model that takes no task is refused first
        predictor = compat.nnunet_predictor(options.step_size, options.use_mirroring, options.device,
                                            options.perform_everything_on_device, options.verbose, options.allow_tqdm)
        predictor.initialize_from_trained_model_folder(os.fspath(model_folder), folds,
                                                       checkpoint_name=options.checkpoint)
        network = single.task_conditioned_network(predictor, model_folder)
        if compat.previous_stage_name(predictor):
            raise UserFacingError(f"The model in {model_folder} is a cascade stage (it needs the predictions of "
                                  f"{compat.previous_stage_name(predictor)}); predict a universal model with its "
                                  f"3d_fullres, 3d_lowres or 2d configuration.")
        stacked = AllTasksNetwork(network, [task_map.task_id(name) for name in task_names],
                                  annotated_only=compat.probabilities_resampled_by_interpolation(predictor))
    what = {"tasks": task_names, "model": os.fspath(model_folder)}
    metadata = {name: (single.output_dataset_json(task_map, name, file_ending, model_folder, dataset_json),
                       single.prediction_arguments(input_folder, folder, options, {"task": name, **what}))
                for name, folder in folders.items() if name != COMBINED}
    if COMBINED in folders:
        metadata[COMBINED] = (combined_dataset_json(task_map, task_names, dataset_json, model_folder),
                              single.prediction_arguments(input_folder, folders[COMBINED], options,
                                                          {"task": combined_key(task_names), **what}))
    with atomic_io.exclusive(output_folder, "nnunet-ext predict"):
        _set_up_output(output_folder, folders, several, task_map, task_names, combine, metadata, model_folder)
    if not todo:
        return task_names, [], done

    writer = CaseWriter(tuple(single.TaskWriter.for_task(task_map, name, classes, folders[name], file_ending)
                              for name, classes in zip(task_names, stacked.classes)),
                        tuple(np.asarray(classes, dtype=np.int64) for classes in stacked.classes),
                        folders.get(COMBINED))
    with atomic_io.scratch_folder(output_folder) as scratch:
        staging = scratch / "input"
        staging.mkdir()
        reader_writer = image_checks.reader_for(dataset_json, next(iter(cases[todo[0]].values())))
        single.prepare_padded_input({case: cases[case] for case in todo}, staging, task_map, file_ending,
                                    reader_writer)
        inputs = [[staging / f"{case}_{c:04d}{file_ending}" for c in range(task_map.max_channels)] for case in todo]
        compat.predict_stacked_cases(predictor, stacked, stacked.block_channels, inputs, todo, writer,
                                     options.save_probabilities, options.num_processes_preprocessing,
                                     options.num_processes_export)
    return task_names, todo, done


def predict_tasks(model_folder: str | os.PathLike, input_folder: str | os.PathLike,
                  output_folder: str | os.PathLike, tasks: Sequence[str] = (ALL,), combine: bool = False,
                  **options: Any) -> tuple[list[str], list[str]]:
    """Predict the cases in ``input_folder`` as each of ``tasks`` (``["all"]``: every task) into
    ``output_folder/<task>/`` (plus ``output_folder/combined/`` with ``combine``); returns (the task names
    predicted, the case ids predicted). ``options``: the fields of
    :class:`~nnunet_ext.tasks.predict.PredictOptions`, as for :func:`nnunet_ext.tasks.predict.predict_task`."""
    names, predicted, _ = run_prediction(model_folder, input_folder, output_folder, list(tasks), several=True,
                                         combine=combine, options=single.PredictOptions(**options))
    return names, predicted

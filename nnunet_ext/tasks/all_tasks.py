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
* :func:`nnunet_ext.compat.predict_stacked_outputs` runs nnU-Net's predictor with it (preprocessing,
  sliding window, Gaussian weighting, mirroring, fold average) and exports each task's block with
  nnU-Net's export (resampling, argmax, writer);
* each task's map is then written as a single-task run writes it (:mod:`nnunet_ext.tasks.predict`:
  the task's own label values and ``dataset.json``) to ``OUT/<task name>/``.

The outputs therefore equal the single-task runs': the per-task logits are computed by the same
operations on the same shared tensors, so the label maps are identical (tests compare the files).

``--combine`` adds ``OUT/combined/``: one map in the merged label space (values and names of the
merged dataset's ``labels``) over the requested tasks. Overlap rule: **the first task in the
``--task`` order that labels a voxel as foreground gives it its label** (``--task all``: task-id
order); background only where every task says background. List a tumour task before its organ's
task to keep tumours that lie inside the organ.

Checks and the write path are the single-task run's: everything checked before anything is written
(input cases against every requested task's channel count; an output folder that is new, empty, or
an earlier prediction of this command with one subfolder per task), a new output folder built in a
staging folder and moved into place, an earlier one's files replaced one by one atomically, one run
at a time per output folder.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_ext import atomic_io, compat
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


def write_combined(luts: Sequence[np.ndarray], block_folders: Sequence[Path], target: Path, cases: Sequence[str],
                   file_ending: str) -> None:
    """Per case, the tasks' label maps (class indices of their blocks, in priority order) -> merged values
    (``luts``) -> :func:`combine_segmentations`, with their geometry, written atomically."""
    import SimpleITK as sitk

    for case in cases:
        images = [sitk.ReadImage(str(folder / f"{case}{file_ending}")) for folder in block_folders]
        values = combine_segmentations([lut[sitk.GetArrayFromImage(image)] for lut, image in zip(luts, images)])
        exported = sitk.GetImageFromArray(values.astype(np.uint8 if values.max(initial=0) < 256 else np.uint16))
        exported.CopyInformation(images[0])
        atomic_io.write_with(target / f"{case}{file_ending}",
                             lambda temporary: sitk.WriteImage(exported, str(temporary), True))


def combined_dataset_json(task_map: TaskMap, task_names: Sequence[str], dataset_json: dict,
                          model_folder: Path) -> dict:
    values = {0} | {v for name in task_names for v in task_map.task(name).annotated_values}
    labels = {name: value for name, value in task_map.labels.items() if value in values and name != IGNORE}
    return {"channel_names": dataset_json.get("channel_names", {}), "labels": labels,
            "file_ending": dataset_json["file_ending"], "numTraining": 0,
            single.OUTPUT_KEY: {"task": combined_key(task_names), "tasks": list(task_names), "rule": COMBINE_RULE,
                                "model": os.fspath(model_folder)}}


def predict_tasks(model_folder: str | os.PathLike, input_folder: str | os.PathLike,
                  output_folder: str | os.PathLike, tasks: Sequence[str] = (ALL,), combine: bool = False,
                  folds: Sequence[int | str] | None = None, checkpoint: str = single.DEFAULT_CHECKPOINT,
                  step_size: float = 0.5, use_mirroring: bool = True, device=None,
                  num_processes_preprocessing: int = 3, num_processes_export: int = 3) -> tuple[list[str], list[str]]:
    """Predict every case in ``input_folder`` as each of ``tasks`` (``["all"]``: every task) into
    ``output_folder/<task>/`` (plus ``output_folder/combined/`` with ``combine``); returns (the task names
    predicted, the case ids written). Options as :func:`nnunet_ext.tasks.predict.predict_task`."""
    model_folder, input_folder, output_folder = Path(model_folder), Path(input_folder), Path(output_folder)
    dataset_json = single.read_model_dataset_json(model_folder)
    try:
        task_map = TaskMap.from_dataset_json(dataset_json)
    except TaskMapError as error:
        raise UserFacingError(f"The model in {model_folder} was not trained on a merged multi-task dataset "
                              f"({error}); predict it with nnUNetv2_predict.") from None
    task_names = resolve_tasks(task_map, tasks, combine)
    folds = single.check_checkpoints(model_folder, folds, checkpoint)
    if not input_folder.is_dir():
        raise UserFacingError(f"Input folder {input_folder} does not exist.")
    if output_folder.resolve() == input_folder.resolve():
        raise UserFacingError("The output folder must differ from the input folder (inputs are never overwritten).")
    file_ending = dataset_json["file_ending"]
    check_output_folder(output_folder, task_names, task_map, combine)
    cases = single.cases_in_folder(input_folder, file_ending)
    try:
        single.check_input_cases(cases, input_folder, task_map, task_names, dataset_json,
                                 single.model_spatial_dims(model_folder))
    except UserFacingError as error:
        if "channels numbered from _0000" not in str(error):
            raise
        raise UserFacingError(f"{error} With several tasks every case must suit each of them: list the tasks its "
                              f"channels fit with --task A,B.") from None
    folder_names = task_names + ([COMBINED] if combine else [])

    with atomic_io.exclusive(output_folder, "nnunet-ext predict"):
        for folder in (output_folder.parent, output_folder, *(output_folder / name for name in folder_names)):
            atomic_io.remove_stale_temporaries(folder)
        earlier = check_output_folder(output_folder, task_names, task_map, combine)  # again: another run may
        with atomic_io.scratch_folder(output_folder) as scratch:                     # have written it
            staging = scratch / "input"
            staging.mkdir()
            case_ids = single.prepare_padded_input(cases, staging, task_map, file_ending)
            predictor = compat.predictor(step_size, use_mirroring, device)
            predictor.initialize_from_trained_model_folder(os.fspath(model_folder), folds, checkpoint_name=checkpoint)
            network = single.task_conditioned_network(predictor, model_folder)
            stacked = AllTasksNetwork(network, [task_map.task_id(name) for name in task_names],
                                      annotated_only=compat.probabilities_resampled_by_interpolation(predictor))
            blocks = {name: scratch / "blocks" / name for name in task_names}  # label maps of block class indices
            for folder in blocks.values():
                folder.mkdir(parents=True)
            inputs = [[staging / f"{case}_{c:04d}{file_ending}" for c in range(task_map.max_channels)]
                      for case in case_ids]
            outputs = [[blocks[name] / case for name in task_names] for case in case_ids]
            compat.predict_stacked_outputs(predictor, stacked, stacked.block_channels, inputs, outputs,
                                           num_processes_preprocessing, num_processes_export)
            merged_luts = [np.array(classes) for classes in stacked.classes]  # block index -> merged value
            with _output_targets(output_folder, folder_names, earlier) as targets:
                for name, merged_lut in zip(task_names, merged_luts):
                    single.relabel(task_map.to_source_lut(name)[merged_lut], blocks[name], targets[name], case_ids,
                                   file_ending)
                    atomic_io.write_json(targets[name] / "dataset.json",
                                         single.output_dataset_json(task_map, name, file_ending, model_folder))
                if combine:
                    write_combined(merged_luts, [blocks[name] for name in task_names], targets[COMBINED], case_ids,
                                   file_ending)
                    atomic_io.write_json(targets[COMBINED] / "dataset.json",
                                         combined_dataset_json(task_map, task_names, dataset_json, model_folder))
    return task_names, case_ids

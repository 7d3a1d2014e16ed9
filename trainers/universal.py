"""The shared base of our multi-dataset (universal) trainers: UniSeg, DoDNet, TransDoDNet.

Trains one network on a merged dataset (``nnunet-ext merge``) whose dataset.json has a
``tasks`` section (:class:`nnunet_ext.tasks.TaskMap`). What it changes in nnU-Net's trainer:

* data: :class:`~nnunet_ext.tasks.sampling.TaskAwareDataLoader` (every batch from one task,
  nnU-Net's cropping, oversampling and augmentation; task weights ``task_weighting`` or
  ``NNUNET_EXT_TASK_WEIGHTING`` = ``cases`` (default) or ``uniform``), for training and validation;
* the network knows the task of each batch (``set_task``, :mod:`nnunet_ext.tasks.conditioning`)
  and, in eval mode, masks the classes the task does not annotate;
* the loss is partial-label (:mod:`nnunet_ext.losses.partial_label`): per batch, nnU-Net's
  Dice+CE over background + the task's annotated classes only, deep supervision as nnU-Net;
* validation: pseudo Dice per task and label in the log each epoch; the final validation
  predicts each task's validation cases with that task set and writes ``summary.json``
  (nnU-Net's format, each case scored on its task's labels only, so find_best_configuration is
  task-aware) and ``summary_per_task.json``;
* the task map goes into the plans saved with the model (``plans.json``, key
  ``nnunet_ext_tasks``; networks are built from it at inference) and into every checkpoint.

Prediction needs the task of each input: ``nnunet-ext predict --task NAME`` (outputs in the
task's own label values), or ``NNUNET_EXT_TASK=NAME nnUNetv2_predict ...`` (merged values).

``nnUNetUniversalTrainer`` itself trains nnU-Net's planned network (wrapped for task
conditioning) this way: the multi-dataset nnU-Net baseline. Region-based datasets are not
supported (the merge tool refuses them).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_ext import atomic_io, compat
from nnunet_ext.losses.partial_label import PartialLabelLoss
from nnunet_ext.tasks.conditioning import TASK_VARIABLE, TaskConditioning
from nnunet_ext.tasks.sampling import TASK_WEIGHTING, TaskAwareDataLoader
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError
from nnunet_ext.trainers.base import nnUNetExtTrainer

TASKS_PLANS_KEY = "nnunet_ext_tasks"
TASK_WEIGHTING_VARIABLE = "NNUNET_EXT_TASK_WEIGHTING"


def task_map_from_plans(plans_manager) -> TaskMap:
    """The task map a universal trainer stored in the plans (training and the model's plans.json)."""
    entry = plans_manager.plans.get(TASKS_PLANS_KEY)
    if entry is None:
        raise TaskMapError(f"These plans carry no task map ({TASKS_PLANS_KEY!r}); a universal trainer adds it when "
                           f"it starts training on a merged dataset (nnunet-ext merge).")
    return TaskMap.from_dict(entry)


def annotated_classes(task_map: TaskMap) -> list[list[bool]]:
    return [list(task_map.annotated_mask(task.task_id)) for task in task_map]


def apply_default_task(network: TaskConditioning, task_map: TaskMap) -> None:
    """``NNUNET_EXT_TASK=NAME``: the task for the stock nnUNetv2_predict (one task per call)."""
    name = os.environ.get(TASK_VARIABLE, "").strip()
    if not name:
        return
    if name not in task_map:
        raise TaskMapError(f"{TASK_VARIABLE}={name!r} is not a task of this model; its tasks are "
                           f"{list(task_map.names)}.")
    network.set_task(task_map.task_id(name))


class TaskConditionedNetwork(TaskConditioning):
    """Any nnU-Net network on a merged dataset: task state and eval-mode masking around it."""

    def __init__(self, network: nn.Module, num_tasks: int, annotated: Sequence[Sequence[bool]], num_classes: int):
        super().__init__()
        self.network = network
        self.init_task_conditioning(num_tasks, annotated, num_classes)

    @property
    def decoder(self):  # nnU-Net flips decoder.deep_supervision for inference
        return self.network.decoder

    def forward(self, x: torch.Tensor):
        self.require_task()
        outputs = self.network(x)
        if isinstance(outputs, (list, tuple)):
            return [self.mask_unannotated(o) for o in outputs]
        return self.mask_unannotated(outputs)


def _unwrap(network: nn.Module) -> nn.Module:
    network = getattr(network, "module", network)  # DDP
    return getattr(network, "_orig_mod", network)  # torch.compile


class nnUNetUniversalTrainer(nnUNetExtTrainer):
    """nnU-Net on a merged multi-dataset: task-aware batches, partial-label loss, per-task validation."""

    #: "cases" (proportional to training cases), "uniform", or {task name: weight}
    task_weighting: str | dict = "cases"
    #: read by ``nnunet-ext demo``: build a merged multi-task dataset for this trainer
    uses_merged_dataset = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            self.task_map = TaskMap.from_dataset_json(dataset_json)
        except TaskMapError as error:
            raise TaskMapError(f"{type(self).__name__} trains on a merged dataset with a 'tasks' section in its "
                               f"dataset.json (build it with `nnunet-ext merge -d ID ID ... -o NEW_ID`): {error}") \
                from None
        self.refuse_regions("the task map, the partial-label loss and the task masks work on label values")
        self.plans_manager.plans[TASKS_PLANS_KEY] = self.task_map.to_dict()
        self._validation_task: int | None = None

    # --- network -------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        task_map = task_map_from_plans(plans_manager)
        network = compat.network_from_plans(configuration_manager.network_arch_class_name,
                                            configuration_manager.network_arch_init_kwargs,
                                            configuration_manager.network_arch_init_kwargs_req_import,
                                            num_input_channels, num_output_channels, enable_deep_supervision)
        wrapped = TaskConditionedNetwork(network, len(task_map), annotated_classes(task_map), num_output_channels)
        apply_default_task(wrapped, task_map)
        return wrapped

    def set_task(self, task_id: int) -> None:
        """Tell the network and the loss which task the next batch belongs to."""
        for owner in (_unwrap(self.network), self.loss):
            for module in owner.modules():
                if isinstance(module, (TaskConditioning, PartialLabelLoss)):
                    module.set_task(task_id)

    # --- loss ----------------------------------------------------------------------------------
    def _build_loss(self):
        ignore_index = self.task_map.num_classes  # above every class index; unannotated values map there
        loss = compat.dice_ce_loss(self.configuration_manager.batch_dice, ignore_label=ignore_index, ddp=self.is_ddp)
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        loss = PartialLabelLoss(loss, annotated_classes(self.task_map), self.task_map.ignore_value, ignore_index)
        if self.enable_deep_supervision:
            weights = super()._build_loss().weight_factors  # nnU-Net's deep-supervision weights
            loss = compat.deep_supervision_loss(loss, weights)
        return loss

    # --- data ----------------------------------------------------------------------------------
    def task_weights(self):
        value = os.environ.get(TASK_WEIGHTING_VARIABLE, "").strip()
        if value and value not in TASK_WEIGHTING:
            raise ValueError(f"{TASK_WEIGHTING_VARIABLE}={value!r} must be one of {TASK_WEIGHTING} (or unset).")
        return value or self.task_weighting

    data_loader_class = TaskAwareDataLoader  # every batch from one task, with the batch's ``task_id``

    def data_loader_kwargs(self) -> dict:
        return {"task_map": self.task_map, "weighting": self.task_weights()}

    # --- steps ---------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        self.set_task(batch["task_id"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        task = int(batch["task_id"])
        self.set_task(task)
        result = super().validation_step(batch)
        annotated = np.array(self.task_map.annotated_mask(task)[1:])  # nnU-Net drops background
        for key in ("tp_hard", "fp_hard", "fn_hard"):
            result[key] = np.where(annotated, result[key], 0)
        result["task_id"] = task
        return result

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        self.log_pseudo_dice_per_task(val_outputs)
        super().on_validation_epoch_end([{k: v for k, v in o.items() if k != "task_id"} for o in val_outputs])

    def log_pseudo_dice_per_task(self, val_outputs: list[dict]) -> dict[str, dict[str, float]]:
        sums: dict[int, np.ndarray] = {}
        for output in val_outputs:
            counts = np.stack([output["tp_hard"], output["fp_hard"], output["fn_hard"]])
            sums[output["task_id"]] = sums.get(output["task_id"], 0) + counts
        names = {v: k for k, v in self.task_map.labels.items()}
        report = {}
        for task_id, (tp, fp, fn) in sorted(sums.items()):
            task = self.task_map.task(task_id)
            report[task.name] = {names[v]: float(2 * tp[v - 1] / max(2 * tp[v - 1] + fp[v - 1] + fn[v - 1], 1e-8))
                                 for v in task.annotated_values}
        if report:
            self.print_to_log_file("Pseudo dice per task:", json.dumps({t: {k: round(v, 4) for k, v in d.items()}
                                                                       for t, d in report.items()}))
        return report

    # --- final validation ----------------------------------------------------------------------
    def do_split(self):
        train_keys, validation_keys = super().do_split()
        if self._validation_task is not None:
            validation_keys = [k for k in validation_keys
                               if self.task_map.task_of_case(k).task_id == self._validation_task]
        return train_keys, validation_keys

    def perform_actual_validation(self, save_probabilities: bool = False):
        _, validation_keys = super().do_split()
        tasks = sorted({self.task_map.task_of_case(k).task_id for k in validation_keys})
        try:
            for task in tasks:
                self._validation_task = task
                _unwrap(self.network).set_task(task)
                self.print_to_log_file(f"Final validation of task {self.task_map.task(task).name}",
                                       also_print_to_console=True)
                super().perform_actual_validation(save_probabilities)
        finally:
            self._validation_task = None
        if self.local_rank == 0:
            self.write_task_aware_summary(validation_keys)

    def write_task_aware_summary(self, validation_keys: Sequence[str]) -> dict:
        """summary.json (nnU-Net's format) and summary_per_task.json, each case on its task's labels."""
        folder = os.path.join(self.output_folder, "validation")
        reference = os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations")
        ending = self.dataset_json["file_ending"]
        reader = self.plans_manager.image_reader_writer_class()
        per_case, per_task = [], defaultdict(list)
        for key in sorted(validation_keys):
            task = self.task_map.task_of_case(key)
            result = compat.case_metrics(os.path.join(reference, key + ending), os.path.join(folder, key + ending),
                                         reader, task.annotated_values, self.label_manager.ignore_label)
            result["task"] = task.name
            per_case.append(result)
            per_task[task.name].append(result)
        summary = summarise(per_case)
        compat.save_summary(summary, os.path.join(folder, "summary.json"))
        by_task = {name: summarise(cases) for name, cases in per_task.items()}
        atomic_io.write_json(os.path.join(folder, "summary_per_task.json"),
                             {name: {"mean": s["mean"], "foreground_mean": s["foreground_mean"]}
                              for name, s in by_task.items()})
        self.print_to_log_file("Task-aware validation Dice:", json.dumps(
            {name: round(s["foreground_mean"].get("Dice", float("nan")), 4) for name, s in by_task.items()}),
            also_print_to_console=True)
        return summary

    # --- checkpoint ----------------------------------------------------------------------------
    def method_state(self) -> dict:
        return {**super().method_state(), "task_map": self.task_map.to_dict()}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        saved = TaskMap.from_dict(state["task_map"])
        if saved != self.task_map:
            raise TaskMapError("The checkpoint was trained with another task map than this dataset's dataset.json "
                               "'tasks' section (tasks, labels or case prefixes differ); resume on the dataset it "
                               "was trained on.")


def summarise(cases: list[dict]) -> dict:
    """nnU-Net's summary layout over cases scored on different label subsets: a label's mean is
    over the cases whose task annotates it; the foreground mean is over labels."""
    values: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for case in cases:
        for label, metrics in case["metrics"].items():
            for name, value in metrics.items():
                values[str(label)][name].append(value)
    means = {label: {name: float(np.nanmean(v)) for name, v in metrics.items()} for label, metrics in values.items()}
    names = sorted({name for m in means.values() for name in m})
    foreground = {name: float(np.mean([m[name] for m in means.values() if name in m])) for name in names}
    return {"metric_per_case": cases, "mean": means, "foreground_mean": foreground}

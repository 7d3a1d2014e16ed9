"""The shared base of our semi-supervised trainers (MC-Net+, LeFeD): labelled + unlabelled batches.

nnU-Net trains on labelled cases only. ``nnUNetSemiSupervisedTrainer`` keeps nnU-Net's loop,
plans, augmentation, validation and inference, and changes only what semi-supervised methods share:

* data: every training batch is ``labeled_batch_size`` labelled + ``unlabeled_batch_size`` unlabelled
  patches (paper default 2 + 2; the plans' batch size is not used for training and the log says so),
  from ``nnunet_ext.unlabeled.loader``. Unlabelled patches come from the preprocessed
  ``imagesUnlabeled`` (``nnunet-ext preprocess-unlabeled``) and, in label-budget mode
  (``NNUNET_EXT_LABEL_BUDGET``), from the fold's training cases beyond the budget. Validation is
  nnU-Net's, on the labelled validation cases, ``labeled_batch_size`` patches per step;
* the step: ``train_step`` moves the batch to the device, runs ``self.network`` on all patches at
  once and calls ``compute_loss(outputs, target, labeled_count)``, the one method a subclass must
  write (default: nnU-Net's loss on the labelled part only). Outputs are labelled first; use
  ``labeled_part``/``unlabeled_part`` to split them. Backward, gradient clipping and AMP as nnU-Net;
* ``self.training_iteration`` counts optimiser steps across epochs (ramp-up schedules such as
  MC-Net+'s ``sigmoid_rampup(iteration // 150, 40)``); it is checkpointed through
  ``method_state`` and comes back on ``--c``. Subclasses extending ``method_state`` call super.

DDP (``nnUNetv2_train ... -num_gpus N``): both batch sizes are global, like nnU-Net's; each process
takes its share (even split, remainder to the lowest ranks), and foreground oversampling applies to
each process's labelled share. Cascaded configurations are not supported (no previous-stage
predictions exist for unlabelled images).

The constructor is nnUNetTrainer's, unchanged. Not a method of its own: it is not in the registry.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from nnunet_ext import compat
from nnunet_ext.trainers.base import nnUNetExtTrainer
from nnunet_ext.unlabeled import budget as label_budget
from nnunet_ext.unlabeled.convention import (UNLABELED_IMAGES_FOLDER, UnlabeledDataError, list_unlabeled_cases,
                                             manifest_path, unlabeled_preprocessed_folder)
from nnunet_ext.unlabeled.loader import (TwoStreamBatches, UnionDataset, UnlabeledDataLoader, labeled_part,
                                         per_process_batch_size, split_processes, unlabeled_part)

__all__ = ["nnUNetSemiSupervisedTrainer", "sigmoid_rampup", "labeled_part", "unlabeled_part"]


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t)^2) with t = current / rampup_length clipped to [0, 1] (Laine & Aila 2017), the
    consistency ramp-up of mean teacher, UA-MT and MC-Net+; 1.0 for a zero length."""
    if rampup_length <= 0:
        return 1.0
    phase = 1.0 - float(np.clip(current, 0.0, rampup_length)) / rampup_length
    return float(math.exp(-5.0 * phase * phase))


class nnUNetSemiSupervisedTrainer(nnUNetExtTrainer):
    """nnU-Net's trainer with two-stream (labelled + unlabelled) batches; see the module docstring."""

    #: read by ``nnunet-ext demo``: write imagesUnlabeled and preprocess it before training
    uses_unlabeled_data = True
    #: label-budget default for a subclass (``NNUNET_EXT_LABEL_BUDGET`` overrides): cases, fraction or "10%"
    label_budget: int | float | str | None = None
    label_budget_seed: int = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.labeled_batch_size = 2
        self.unlabeled_batch_size = 2
        self.training_iteration = 0
        self.unlabeled_training_keys: list[str] = []  # budget cases used as unlabelled (set by do_split)
        self.labeled_batch_size_per_process = self.unlabeled_batch_size_per_process = None

    # --- batch sizes ----------------------------------------------------------------------------
    def _set_batch_size_and_oversample(self):
        """Our two batch sizes replace the plans' (nnU-Net calls this from ``initialize``)."""
        for name in ("labeled_batch_size", "unlabeled_batch_size"):
            value = getattr(self, name)
            minimum = 1 if name == "labeled_batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{type(self).__name__}.{name} = {value!r}: must be a whole number >= {minimum}")
        world_size, rank = compat.distributed_world()
        self.labeled_batch_size_per_process = per_process_batch_size(self.labeled_batch_size, world_size, rank)
        self.unlabeled_batch_size_per_process = per_process_batch_size(self.unlabeled_batch_size, world_size, rank)
        self.batch_size = self.labeled_batch_size_per_process  # nnU-Net's validation loader uses it
        per_process = "" if world_size == 1 else (
            f" (this process {rank}/{world_size}: {self.labeled_batch_size_per_process} + "
            f"{self.unlabeled_batch_size_per_process})")
        self.print_to_log_file(
            f"nnunet-ext: batch = {self.labeled_batch_size} labelled + {self.unlabeled_batch_size} unlabelled patches"
            f"{per_process}; the plans' batch size ({self.configuration_manager.batch_size}) is not used for training")

    # --- label budget ---------------------------------------------------------------------------
    def do_split(self):
        """nnU-Net's split; under a label budget only the budget's cases of the training part keep labels."""
        training, validation = super().do_split()
        budget, seed = label_budget.budget_from(self.label_budget, self.label_budget_seed)
        split = label_budget.apply_budget(self.output_folder, training, budget, seed, self.fold,
                                          write=self.local_rank == 0)
        if split is None:
            self.unlabeled_training_keys = []
            return training, validation
        self.unlabeled_training_keys = list(split.unlabeled)
        self.print_to_log_file(
            f"nnunet-ext: label budget {budget.describe()} (seed {seed}): {len(split.labeled)} of {len(training)} "
            f"training cases labelled, {len(split.unlabeled)} used as unlabelled; "
            f"{'read back from' if split.reused else 'saved in'} {split.path}")
        return split.labeled, validation

    # --- data -----------------------------------------------------------------------------------
    def unlabeled_folder(self) -> Path:
        """Where ``nnunet-ext preprocess-unlabeled`` puts this configuration's unlabelled cases."""
        return unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier)

    def get_unlabeled_dataset(self):
        """The unlabelled pool: budget cases (labelled folder, labels unused) + preprocessed imagesUnlabeled."""
        if self.is_cascaded:
            raise UnlabeledDataError(f"{type(self).__name__} does not support cascaded configurations "
                                     f"({self.configuration_name}): unlabelled images have no previous-stage "
                                     f"predictions. Use 3d_fullres, 3d_lowres or 2d.")
        parts = []
        if self.unlabeled_training_keys:
            parts.append(self.dataset_class(self.preprocessed_dataset_folder, list(self.unlabeled_training_keys)))
        cases = self._preprocessed_unlabeled_cases()
        if cases:
            folder = self.unlabeled_folder()
            parts.append(compat.dataset_class_of_folder(folder)(str(folder), list(cases)))
        if not parts:
            raise UnlabeledDataError(
                f"{type(self).__name__} needs unlabelled images, and {self.plans_manager.dataset_name} has none for "
                f"{self.configuration_name}: put them in nnUNet_raw/{self.plans_manager.dataset_name}/"
                f"{UNLABELED_IMAGES_FOLDER} and run `{self._preprocess_command()}`, or use part of the labelled cases "
                f"as unlabelled with {label_budget.BUDGET_VARIABLE} (e.g. =0.2).")
        return UnionDataset(parts)

    def _preprocess_command(self) -> str:
        return (f"nnunet-ext preprocess-unlabeled -d {self.plans_manager.dataset_name} -c {self.configuration_name} "
                f"-p {self.plans_manager.plans_name}")

    def _preprocessed_unlabeled_cases(self) -> list[str]:
        """Cases listed in the unlabelled manifest, checked against the current plans; [] if there are none."""
        from nnunet_ext.unlabeled.preprocess import plans_stamp, read_manifest

        folder = self.unlabeled_folder()
        manifest = read_manifest(folder)
        raw = os.environ.get("nnUNet_raw")
        raw_images = Path(raw, self.plans_manager.dataset_name, UNLABELED_IMAGES_FOLDER) if raw else None
        if manifest is None:
            if raw_images is not None and raw_images.is_dir():
                raise UnlabeledDataError(f"{raw_images} exists but is not preprocessed for {self.configuration_name} "
                                         f"({manifest_path(folder)} missing). Run `{self._preprocess_command()}`.")
            return []
        stamp = plans_stamp(self.plans_manager, self.configuration_manager, self.dataset_json)
        if manifest["stamp"] != stamp:
            raise UnlabeledDataError(f"{folder} was preprocessed with other plans than {self.plans_manager.plans_name} "
                                     f"now has. Run `{self._preprocess_command()}` again (it redoes what changed).")
        if raw_images is not None and raw_images.is_dir():
            raw_cases = {case.identifier for case in list_unlabeled_cases(raw_images.parent, self.dataset_json)}
            if raw_cases != set(manifest["cases"]):
                raise UnlabeledDataError(
                    f"{raw_images} has changed since it was preprocessed ({len(raw_cases - set(manifest['cases']))} "
                    f"new, {len(set(manifest['cases']) - raw_cases)} removed). Run `{self._preprocess_command()}` "
                    f"again (it only does the new ones).")
        return list(manifest["cases"])

    def training_batches(self, dataset, transforms, initial_patch_size, num_processes: int):
        """Two streams (see nnunet_ext.unlabeled.loader): the fold's labelled cases in nnU-Net's loader and
        the unlabelled pool (``get_unlabeled_dataset``), both with nnU-Net's training transforms, the
        augmentation workers shared between them by batch size."""
        labeled_n, unlabeled_n = self.labeled_batch_size_per_process, self.unlabeled_batch_size_per_process
        labeled_processes, unlabeled_processes = split_processes(num_processes, labeled_n, unlabeled_n)
        labeled = self.augmenter(self.data_loader(dataset, labeled_n, initial_patch_size, transforms),
                                 labeled_processes, max(6, labeled_processes // 2))
        unlabeled = None
        if unlabeled_n > 0:
            unlabeled_dataset = self.get_unlabeled_dataset()
            self.print_to_log_file(f"nnunet-ext: {len(dataset.identifiers)} labelled training cases, "
                                   f"{len(unlabeled_dataset.identifiers)} unlabelled cases")
            loader = UnlabeledDataLoader(unlabeled_dataset, unlabeled_n, initial_patch_size,
                                         self.configuration_manager.patch_size, self.label_manager,
                                         transforms=transforms)
            unlabeled = self.augmenter(loader, unlabeled_processes, max(6, unlabeled_processes // 2))
        return TwoStreamBatches(labeled, unlabeled, labeled_n, unlabeled_n)

    def on_train_end(self):
        super().on_train_end()  # nnU-Net stops its own augmenter types only
        if isinstance(self.dataloader_train, TwoStreamBatches):
            self.dataloader_train._finish()

    # --- the step -------------------------------------------------------------------------------
    def compute_loss(self, outputs, target, labeled_count: int) -> torch.Tensor:
        """The method's loss. ``outputs`` = ``self.network(data)`` for all patches (labelled first),
        ``target`` = nnU-Net's target for the labelled part. Default: nnU-Net's loss on the labelled part
        only (a supervised baseline; the unlabelled patches still pass the network)."""
        return self.loss(labeled_part(outputs, labeled_count), target)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step structure around ``compute_loss``; counts ``training_iteration``."""
        data, target = self.batch_to_device(batch)
        labeled_count = int(batch["labeled_count"])
        self.optimizer.zero_grad(set_to_none=True)
        with compat.training_autocast(self.device):
            outputs = self.network(data)
            loss = self.compute_loss(outputs, target, labeled_count)
        self.optimizer_step(loss)
        self.training_iteration += 1
        return {"loss": loss.detach().cpu().numpy()}

    # --- state across --c -----------------------------------------------------------------------
    def method_state(self) -> dict:
        return {**super().method_state(), "training_iteration": self.training_iteration}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.training_iteration = int(state.get("training_iteration", 0))
        self.print_to_log_file(f"nnunet-ext: resumed at training iteration {self.training_iteration}")

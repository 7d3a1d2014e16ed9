"""The base class of every nnunet-ext trainer: nnU-Net's trainer plus two things methods need.

1. Short runs without editing code: ``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERS_PER_EPOCH`` and
   ``NNUNET_EXT_VAL_ITERS`` override the schedule a trainer (or its paper) sets. They are applied
   in ``initialize`` (after every subclass constructor has set its schedule, before the learning
   rate schedule is built from ``num_epochs``). Unset, the trainer's own values apply.
2. Crash-safe checkpoints with the method state inside: a method trainer returns its extra state
   (task maps, ramp-up step, ...) from ``method_state`` and restores it in ``load_method_state``.
   ``save_checkpoint`` writes the dict nnU-Net would save plus that state (key ``nnunet_ext_state``)
   once, atomically (``compat.write_checkpoint``): a job killed at any moment of a save leaves each
   checkpoint name with its previous or its new complete file. ``load_checkpoint`` (``--c``,
   ``--val``) checks the file first; an unreadable one is reported and the next intact checkpoint
   of the folder (final, latest, best) is loaded instead; a checkpoint without method state is
   reported as such. Temporary files of killed saves are removed in ``initialize``.
3. One place for the optimiser step: nnU-Net hard-codes gradient-norm clipping at 12 inside
   ``train_step``. A method whose paper clips differently (TransDoDNet 0.1) or not at all (MC-Net+)
   sets ``grad_clip``; ``optimizer_step`` is the backward/scale/clip/step sequence that every
   custom step of ours (semi-supervised passes, LeFeD's inner passes) shares. With
   ``grad_clip == 12`` nnU-Net's own ``train_step`` runs unchanged.
4. One data-loading seam: ``get_dataloaders`` is written once here and methods configure it with
   hooks instead of overriding it: ``data_loader_class`` / ``data_loader_kwargs`` (the patch sampler
   of both streams, e.g. the universal trainers' task-aware loader), ``training_batches`` (the
   training stream, e.g. the semi-supervised labelled + unlabelled batches or ClassSAM's cached
   embeddings) and ``start_streams`` (nnU-Net's first ``next`` on each stream). A trainer that
   configures none of them runs nnU-Net's own ``get_dataloaders``.
5. ``refuse_regions(reason)``: the one refusal of region-based datasets (``regions`` in dataset.json)
   for methods that cannot train on them, a one-line UserFacingError.

The constructor is nnUNetTrainer's, unchanged (nnU-Net re-creates trainers from it).
"""
from __future__ import annotations

import os
import sys

import torch

from nnunet_ext import atomic_io, compat, pretrained
from nnunet_ext.errors import UserFacingError, install_excepthook

nnUNetTrainer = compat.base_trainer_class()
install_excepthook()  # our trainers' one-line errors stay one line under nnUNetv2_train
# -pretrained_weights: our networks' heads are named in nnunet_ext.pretrained.HEADS (others: nnU-Net's loader)
pretrained.install()

METHOD_STATE_KEY = "nnunet_ext_state"
NNUNET_GRAD_CLIP = 12.0  # the max norm nnU-Net's train_step clips at
#: the data hooks of ``nnUNetExtTrainer.get_dataloaders`` (a trainer overriding none runs nnU-Net's own)
_DATA_HOOKS = ("data_loader_class", "data_loader_kwargs", "data_loader", "training_batches", "start_streams")
SHORT_RUN_VARIABLES = {
    "NNUNET_EXT_NUM_EPOCHS": "num_epochs",
    "NNUNET_EXT_ITERS_PER_EPOCH": "num_iterations_per_epoch",
    "NNUNET_EXT_VAL_ITERS": "num_val_iterations_per_epoch",
}


def short_run_overrides(environ=os.environ) -> dict[str, int]:
    """Trainer attribute -> value for each short-run variable that is set; a bad value raises
    UserFacingError (one line under ``nnUNetv2_train``, see ``install_excepthook``)."""
    overrides = {}
    for variable, attribute in SHORT_RUN_VARIABLES.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise UserFacingError(f"{variable}={text!r} is not a positive whole number. Set it to e.g. 1, or unset "
                                  f"it (`unset {variable}`) to use the trainer's own schedule.")
        overrides[attribute] = value
    return overrides


class nnUNetExtTrainer(nnUNetTrainer):
    """nnU-Net's default trainer with nnunet-ext's short-run variables and checkpointed method state."""

    #: max gradient norm of a step; None: no clipping. nnU-Net's own ``train_step`` runs at 12.
    grad_clip: float | None = NNUNET_GRAD_CLIP

    def initialize(self):
        for attribute, value in short_run_overrides().items():
            self.print_to_log_file(f"nnunet-ext: {attribute} = {value} (was {getattr(self, attribute)}), "
                                   f"set by the environment")
            setattr(self, attribute, value)
        if self.local_rank == 0:
            self.remove_stale_temporaries()
        super().initialize()

    def remove_stale_temporaries(self) -> None:
        """Remove what killed saves of earlier runs left in the fold and validation folders (only
        atomic_io's temporary names whose process is gone); logged."""
        for folder in (self.output_folder, os.path.join(self.output_folder, "validation")):
            for path in atomic_io.remove_stale_temporaries(folder):
                self.print_to_log_file(f"nnunet-ext: removed {path}, left by an interrupted save")

    def train_step(self, batch: dict) -> dict:
        if self.grad_clip == NNUNET_GRAD_CLIP:
            return super().train_step(batch)  # nnU-Net's step, unchanged
        data, target = self.batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with compat.training_autocast(self.device):
            loss = self.loss(self.network(data), target)
        self.optimizer_step(loss)
        return {"loss": loss.detach().cpu().numpy()}

    def batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """``batch["data"]`` and ``batch["target"]`` (a list under deep supervision) on the trainer's device."""
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), target

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward and step as nnU-Net's ``train_step``: gradient scaling under AMP, the gradient norm
        clipped at ``grad_clip`` (skipped when it is None)."""
        parameters = self.network.parameters()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.grad_scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            self.optimizer.step()

    def refuse_regions(self, reason: str) -> None:
        """Raise a one-line UserFacingError when the dataset is region-based (dataset.json ``regions``);
        ``reason``: why this method cannot train on regions."""
        if self.label_manager.has_regions:
            raise UserFacingError(f"{type(self).__name__} does not support region-based datasets (dataset.json "
                                  f"'regions'): {reason}. Train it on a dataset with plain labels, or use a trainer "
                                  f"that supports regions (e.g. nnUNetTrainer, BANetTrainer).")

    # --- data: one get_dataloaders, configured by the hooks below ---------------------------------
    #: the patch sampler of the training and validation streams: nnU-Net's ``nnUNetDataLoader`` or a
    #: subclass taking its arguments (plus ``data_loader_kwargs``)
    data_loader_class = compat.nnunet_data_loader_class()

    def data_loader_kwargs(self) -> dict:
        """Keyword arguments ``data_loader_class`` takes besides nnU-Net's (default: none)."""
        return {}

    def data_loader(self, dataset, batch_size: int, patch_size, transforms):
        """A ``data_loader_class`` sampler as nnU-Net's trainer makes one: ``patch_size`` crops (the larger
        rotation-safe size for training), the configuration's final patch size, the trainer's
        foreground oversampling."""
        return self.data_loader_class(
            dataset, batch_size, patch_size, self.configuration_manager.patch_size, self.label_manager,
            oversample_foreground_percent=self.oversample_foreground_percent, sampling_probabilities=None,
            pad_sides=None, transforms=transforms, probabilistic_oversampling=self.probabilistic_oversampling,
            **self.data_loader_kwargs())

    def augmenter(self, loader, num_processes: int, num_cached: int):
        """``loader`` in the background augmenter nnU-Net uses (single-threaded for 0 processes)."""
        return compat.background_augmenter(loader, num_processes, num_cached, self.device.type == "cuda")

    def training_batches(self, dataset, transforms, initial_patch_size, num_processes: int):
        """The training stream: nnU-Net's (one loader of ``batch_size`` patches in its augmenter)."""
        loader = self.data_loader(dataset, self.batch_size, initial_patch_size, transforms)
        return self.augmenter(loader, num_processes, max(6, num_processes // 2))

    def start_streams(self, train, validation) -> None:
        """Draw one batch of each stream, as nnU-Net does, so that its workers start now and a broken
        stream fails before the first epoch."""
        next(train)
        next(validation)

    def configures_data(self) -> bool:
        """True when this trainer overrides one of the data hooks (else nnU-Net's ``get_dataloaders`` runs)."""
        cls = type(self)
        return any(getattr(cls, name) is not getattr(nnUNetExtTrainer, name) for name in _DATA_HOOKS)

    def get_dataloaders(self):
        """(training stream, validation stream) as nnU-Net's ``get_dataloaders``, built from the hooks."""
        if not self.configures_data():
            return super().get_dataloaders()  # nnU-Net's own, unchanged
        if self.dataset_class is None:
            self.dataset_class = compat.dataset_class_of_folder(self.preprocessed_dataset_folder)
        train_transforms, validation_transforms, initial_patch_size = compat.trainer_data_transforms(self)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        processes = compat.augmentation_processes()
        train = self.training_batches(dataset_tr, train_transforms, initial_patch_size, processes)
        patch_size = self.configuration_manager.patch_size
        validation = self.augmenter(self.data_loader(dataset_val, self.batch_size, patch_size, validation_transforms),
                                    max(1, processes // 2) if processes else 0, max(3, processes // 4))
        self.start_streams(train, validation)
        return train, validation

    def method_state(self) -> dict:
        """State a method must keep across ``--c`` besides weights/optimiser; override in methods."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore what ``method_state`` returned; override in methods."""

    def has_method_state(self) -> bool:
        """True for trainers that override ``method_state`` (their checkpoints carry ``nnunet_ext_state``)."""
        return type(self).method_state is not nnUNetExtTrainer.method_state

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the method state, written once and atomically (nothing on
        processes other than rank 0 or with checkpointing disabled, as nnU-Net)."""
        checkpoint = compat.nnunet_checkpoint(self)
        if checkpoint is None:
            return
        if self.has_method_state():
            checkpoint[METHOD_STATE_KEY] = self.method_state()
        compat.write_checkpoint(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's load of the first intact checkpoint (see ``intact_checkpoint``), then the method state."""
        if isinstance(filename_or_checkpoint, dict):
            checkpoint, source = filename_or_checkpoint, "the checkpoint given"
            super().load_checkpoint(checkpoint)
        else:
            source, checkpoint = self.intact_checkpoint(os.fspath(filename_or_checkpoint))
            super().load_checkpoint(source)
        if METHOD_STATE_KEY in checkpoint:
            self.load_method_state(checkpoint[METHOD_STATE_KEY])
        elif self.has_method_state():
            names = ", ".join(self.method_state())
            self.warn(f"checkpoint {source} holds no nnunet-ext method state (key {METHOD_STATE_KEY!r}; it was "
                      f"written by another trainer or an older nnunet-ext), so {type(self).__name__}'s method state "
                      f"({names}) STARTS AGAIN FROM ITS INITIAL VALUE instead of where the training stopped; "
                      f"weights, optimiser and epoch are restored. Resume from a checkpoint of this trainer to "
                      f"keep it.")

    def intact_checkpoint(self, filename: str) -> tuple[str, dict]:
        """(path, checkpoint) of the first loadable file among ``filename`` and the other checkpoints
        of its folder in nnU-Net's order (final, latest, best). Each unreadable file is reported with
        a warning; when none is intact, a UserFacingError names them all and the ways out."""
        folder = os.path.dirname(os.path.abspath(filename))
        candidates = [filename] + [path for path in (os.path.join(folder, name) for name in compat.CHECKPOINT_NAMES)
                                   if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(filename)]
        problems = []
        for position, path in enumerate(candidates):
            try:
                return path, compat.read_intact_checkpoint(path)
            except compat.UnreadableCheckpoint as problem:
                problems.append(f"{path} {problem}")
                following = candidates[position + 1:]
                if following:
                    self.warn(f"checkpoint {path} {problem}; trying {following[0]} instead.")
        raise UserFacingError(
            f"no intact checkpoint to load: {'; '.join(problems)}. Restore a copy of one of these files, or delete "
            f"them to start this fold anew (nnUNetv2_train without --c; everything trained so far is lost).")

    def warn(self, message: str) -> None:
        """A warning in the training log and on stderr (rank 0 only), for things that must not go unnoticed."""
        if self.local_rank == 0:
            self.print_to_log_file(f"nnunet-ext: WARNING: {message}", also_print_to_console=False)
            print(f"nnunet-ext: WARNING: {message}", file=sys.stderr, flush=True)

"""The base class of every nnunet-ext trainer: nnU-Net's trainer plus two things methods need.

1. Short runs without editing code: ``NNUNET_EXT_NUM_EPOCHS``, ``NNUNET_EXT_ITERS_PER_EPOCH`` and
   ``NNUNET_EXT_VAL_ITERS`` override the schedule a trainer (or its paper) sets. They are applied
   in ``initialize`` (after every subclass constructor has set its schedule, before the learning
   rate schedule is built from ``num_epochs``). Unset, the trainer's own values apply.
2. Method state in checkpoints: a method trainer returns its extra state (task maps, ramp-up
   step, ...) from ``method_state`` and restores it in ``load_method_state``; it is saved under
   the key ``nnunet_ext_state`` of every checkpoint nnU-Net writes and comes back on ``--c``.
3. One place for the optimiser step: nnU-Net hard-codes gradient-norm clipping at 12 inside
   ``train_step``. A method whose paper clips differently (TransDoDNet 0.1) or not at all (MC-Net+)
   sets ``grad_clip``; ``optimizer_step`` is the backward/scale/clip/step sequence that every
   custom step of ours (semi-supervised passes, LeFeD's inner passes) shares. With
   ``grad_clip == 12`` nnU-Net's own ``train_step`` runs unchanged.

The constructor is nnUNetTrainer's, unchanged (nnU-Net re-creates trainers from it).
"""
from __future__ import annotations

import os

import torch

from nnunet_ext import compat
from nnunet_ext.errors import install_excepthook

nnUNetTrainer = compat.base_trainer_class()
install_excepthook()  # our trainers' one-line errors stay one line under nnUNetv2_train

METHOD_STATE_KEY = "nnunet_ext_state"
NNUNET_GRAD_CLIP = 12.0  # the max norm nnU-Net's train_step clips at
SHORT_RUN_VARIABLES = {
    "NNUNET_EXT_NUM_EPOCHS": "num_epochs",
    "NNUNET_EXT_ITERS_PER_EPOCH": "num_iterations_per_epoch",
    "NNUNET_EXT_VAL_ITERS": "num_val_iterations_per_epoch",
}


def short_run_overrides(environ=os.environ) -> dict[str, int]:
    """Trainer attribute -> value for each short-run variable that is set; bad values raise."""
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
            raise ValueError(f"{variable}={text!r} is not a positive whole number. Set it to e.g. 1, or unset it "
                             f"(`unset {variable}`) to use the trainer's own schedule.")
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
        super().initialize()

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

    def method_state(self) -> dict:
        """State a method must keep across ``--c`` besides weights/optimiser; override in methods."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore what ``method_state`` returned; override in methods."""

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        state = self.method_state()
        if state and self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = dict(compat.read_checkpoint(filename))
            checkpoint[METHOD_STATE_KEY] = state
            compat.write_checkpoint(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) \
            else compat.read_checkpoint(filename_or_checkpoint)
        if METHOD_STATE_KEY in checkpoint:
            self.load_method_state(checkpoint[METHOD_STATE_KEY])

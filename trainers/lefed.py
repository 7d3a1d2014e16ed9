"""LeFeDTrainer: LeFeD (learning from feature discrepancy, maxwell0027/LeFeD), semi-supervised, in nnU-Net v2.

Network: :class:`nnunet_ext.architectures.lefed.LeFeD`, built by :meth:`LeFeDTrainer.build_network_architecture`
from the configuration's plans (input channels, classes, the plans' downsampling strides, so patch
size and anisotropy are nnU-Net's; the plans' own network class is not used). Data: the two-stream
batches of :class:`~nnunet_ext.trainers.semi_supervised.nnUNetSemiSupervisedTrainer` (2 labelled + 2
unlabelled patches, as the paper).

The step (official ``train.py``): three passes over the same batch, each with its own backward and
optimiser step (``optimizer_step`` of the base: AMP and clipping as nnU-Net). Pass 1 has no feedback;
passes 2 and 3 feed back ``1e-3 * (decoder 2 features - decoder 1 features)`` of the previous pass,
detached. The logged loss is the mean of the three passes' losses.

Loss of every pass (:class:`nnunet_ext.losses.semi_supervised.LeFeDLoss`), as the official code:
  Dice(decoder 1) + Dice(decoder 2) on the labelled part
  + 0.8, 0.6, 0.4, 0.2, 0.1 x side Dice (full-resolution stage first, bottleneck last)
  + MSE(softmax 1, softmax 2) on all patches, weight 1, nothing detached.
Decisions: the Dice is the official one (``1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5)``
over the whole labelled batch); the official code is binary (class 1 only), for more classes we
average it over the foreground classes, and ignore-label voxels (nnU-Net's ``ignore`` label) are left
out. The side outputs are upsampled to the patch inside the network as in the official ``SideConv``
(trilinear), rather than downsampling the targets as nnU-Net does: the target stays one full-size
tensor, so ``enable_deep_supervision`` is False and nnU-Net makes no target pyramid. The official
code computes a sigmoid ramp-up weight (``sigmoid_rampup(iter // 150, 40)``) but never applies it:
the consistency term is added with weight 1 from the first iteration, and so is it here.
Region-based (``regions`` in dataset.json) training is refused: the losses are softmax-based.

Schedule (official): SGD lr 0.01, momentum 0.9 (no Nesterov), weight decay 1e-4; lr x0.1 every
2,500 iterations, keyed on the checkpointed ``training_iteration`` (one iteration = one batch = three
optimiser steps, as the official ``iter_num``), so it continues on ``--c``; 15,000 iterations =
``num_epochs`` 60 x ``num_iterations_per_epoch`` 250. nnU-Net's validation (Dice+CE on decoder 1's
logits, labelled validation cases) and inference (decoder 1, one pass) are unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.lefed import LeFeD, LeFeDOutput, discrepancy_feedback, strides_from_plans
from nnunet_ext.losses.semi_supervised import LeFeDLoss
from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer

PASSES_PER_BATCH = 3


def lefed_learning_rate(iteration: int, initial_lr: float = 0.01, step_size: int = 2500, gamma: float = 0.1) -> float:
    """The official step schedule: ``initial_lr * gamma ** (iteration // step_size)`` for batch ``iteration``
    (0-based); iterations 0..2499 use 0.01, 2500..4999 0.001, ..."""
    return initial_lr * gamma ** (int(iteration) // step_size)


class IterationStepLR:
    """nnU-Net's scheduler slot (``step(epoch)`` at every epoch start) for a per-iteration step schedule:
    ``step`` ignores the epoch and sets the lr of ``iteration()``, the trainer's batch counter."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, iteration: Callable[[], int],
                 step_size: int = 2500, gamma: float = 0.1):
        self.optimizer, self.initial_lr, self.iteration = optimizer, initial_lr, iteration
        self.step_size, self.gamma = step_size, gamma

    def step(self, epoch: int | None = None) -> float:
        lr = lefed_learning_rate(self.iteration(), self.initial_lr, self.step_size, self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


class LeFeDTrainer(nnUNetSemiSupervisedTrainer):
    """LeFeD in nnU-Net: three feedback passes per batch, official loss and step schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one full-size target; the side outputs are upsampled instead
        self.initial_lr = 0.01
        self.momentum = 0.9
        self.weight_decay = 1e-4
        self.lr_step_size, self.lr_gamma = 2500, 0.1
        self.num_epochs = 60  # x 250 iterations = 15,000 (official)
        self.num_iterations_per_epoch = 250
        self.lefed_loss: LeFeDLoss | None = None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> LeFeD:
        """LeFeD with the plans' first four downsampling strides (see ``strides_from_plans``)."""
        strides = configuration_manager.network_arch_init_kwargs.get("strides")
        if strides is None:
            strides = configuration_manager.pool_op_kernel_sizes
        dim = len(configuration_manager.patch_size)
        return LeFeD(input_channels=num_input_channels, num_classes=num_output_channels,
                     strides=strides_from_plans(strides, dim), deep_supervision=enable_deep_supervision)

    def initialize(self):
        self.refuse_regions("LeFeD's losses are softmax-based")
        self.lefed_loss = LeFeDLoss(self.label_manager.ignore_label)
        super().initialize()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), lr=self.initial_lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        scheduler = IterationStepLR(optimizer, self.initial_lr, lambda: self.training_iteration,
                                    self.lr_step_size, self.lr_gamma)
        return optimizer, scheduler

    def compute_loss(self, outputs: LeFeDOutput, target, labeled_count: int) -> torch.Tensor:
        return self.lefed_loss(outputs, target, labeled_count)

    def train_step(self, batch: dict) -> dict:
        """Three passes, each its own backward and optimiser step; later passes get the previous pass's
        detached feature discrepancy. ``training_iteration`` counts batches (the lr schedule's unit)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = target[0] if isinstance(target, list) else target
        target = target.to(self.device, non_blocking=True)
        labeled_count = int(batch["labeled_count"])
        self.lr_scheduler.step()
        feedback, losses = None, []
        for _ in range(PASSES_PER_BATCH):
            self.optimizer.zero_grad(set_to_none=True)
            with compat.training_autocast(self.device):
                outputs = self.network(data, feedback=feedback, training_outputs=True)
                loss = self.compute_loss(outputs, target, labeled_count)
            self.optimizer_step(loss)
            feedback = discrepancy_feedback(outputs)
            losses.append(loss.detach())
            del outputs
        self.training_iteration += 1
        return {"loss": torch.stack(losses).mean().cpu().numpy()}

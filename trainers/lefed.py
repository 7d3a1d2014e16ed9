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

Loss of every pass (:class:`LeFeDLoss`), as the official code:
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

from typing import Callable, Sequence

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.lefed import LeFeD, LeFeDOutput, discrepancy_feedback, vnet_strides
from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer

SIDE_WEIGHTS = (0.8, 0.6, 0.4, 0.2, 0.1)  # full-resolution side head first (official los1..los5)
PASSES_PER_BATCH = 3
DICE_SMOOTH = 1e-5


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


def official_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The official ``dice_loss`` per foreground class (squared sums over the whole batch), averaged over
    classes 1..C-1. ``target``: (B, 1, ...) label map; ``valid``: (B, 1, ...) mask of voxels to count."""
    losses = []
    for c in range(1, probabilities.shape[1]):
        p = probabilities[:, c:c + 1]
        t = (target == c).to(p.dtype)
        if valid is not None:
            p, t = p * valid, t * valid
        dice = (2 * (p * t).sum() + DICE_SMOOTH) / ((p * p).sum() + (t * t).sum() + DICE_SMOOTH)
        losses.append(1 - dice)
    return torch.stack(losses).mean()


class LeFeDLoss:
    """One pass's loss (see the module docstring); ``terms`` gives the parts for logging and tests."""

    def __init__(self, ignore_label: int | None = None, side_weights: Sequence[float] = SIDE_WEIGHTS,
                 consistency_weight: float = 1.0):
        self.ignore_label, self.side_weights = ignore_label, tuple(side_weights)
        self.consistency_weight = consistency_weight

    def terms(self, outputs: LeFeDOutput, target: torch.Tensor, labeled_count: int) -> dict[str, torch.Tensor]:
        if isinstance(target, (list, tuple)):
            raise TypeError("LeFeDLoss takes the full-resolution target only (enable_deep_supervision = False)")
        target = target[:labeled_count]  # the base passes the labelled part's target only; kept explicit
        valid = None if self.ignore_label is None else (target != self.ignore_label).float()

        def dice(logits: torch.Tensor) -> torch.Tensor:
            return official_dice_loss(torch.softmax(logits[:labeled_count].float(), 1), target, valid)

        soft1, soft2 = torch.softmax(outputs.logits1.float(), 1), torch.softmax(outputs.logits2.float(), 1)
        side = sum(w * dice(s) for w, s in zip(self.side_weights, outputs.side))
        return {"dice1": dice(outputs.logits1), "dice2": dice(outputs.logits2), "side": side,
                "consistency": self.consistency_weight * torch.mean((soft1 - soft2) ** 2)}

    def __call__(self, outputs: LeFeDOutput, target: torch.Tensor, labeled_count: int) -> torch.Tensor:
        return sum(self.terms(outputs, target, labeled_count).values())


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
        """LeFeD with the plans' first four downsampling strides (see ``vnet_strides``)."""
        strides = configuration_manager.network_arch_init_kwargs.get("strides")
        if strides is None:
            strides = configuration_manager.pool_op_kernel_sizes
        dim = len(configuration_manager.patch_size)
        return LeFeD(input_channels=num_input_channels, num_classes=num_output_channels,
                     strides=vnet_strides(strides, dim), deep_supervision=enable_deep_supervision)

    def initialize(self):
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__}: LeFeD's losses are softmax-based; region-based training "
                               f"('regions' in dataset.json) is not supported.")
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

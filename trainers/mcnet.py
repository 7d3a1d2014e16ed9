"""MCNetPlusTrainer: MC-Net+ (Wu et al., MedIA 2022; ycwu1997/MC-Net) as a semi-supervised nnU-Net v2 trainer.

Network: :class:`nnunet_ext.architectures.mcnet.MCNet`, 3 decoders, built from the configuration's
plans: input channels and classes from nnU-Net, per-level downsampling from the plans' strides
(the first 4 pooling steps, the paper's depth; see ``downsampling_from_plans``), so nnU-Net's patch
size and anisotropic spacing work with the default ``nnUNetPlans``. 3D configurations only (the
paper's 2D variant is a different, U-Net-based model). Inference uses decoder 1, as the paper.

Batches: the semi-supervised base's 2 labelled + 2 unlabelled patches, one forward pass for all four
(as official: BatchNorm sees both). Loss of one step, as the official ``train_mcnet_3d.py``:

    0.5 * sum_d Dice(p_d[labelled], y) + w(t) * sum_{i != j} MSE(p_i, sharpen(p_j))

* p_d = softmax of decoder d's logits; the consistency uses all patches (labelled + unlabelled)
  and every channel, and nothing is detached (the official code copies the probabilities into
  buffers in a way that keeps the graph, so gradients reach both sides of every pair);
* sharpen(P) = P^(1/T) / (P^(1/T) + (1 - P)^(1/T)), T = 0.1;
* Dice: the official binary soft Dice on the labelled part, batch Dice with eps 1e-8, generalised
  to several classes as the mean over the foreground classes (nnU-Net's
  ``MemoryEfficientSoftDiceLoss``, no background; identical to the official for 2 classes);
  nnU-Net's ignore label is masked out. Where we had to decide: not nnU-Net's Dice+CE, because the
  official code computes the CE term but never adds it to the loss;
* w(t) = 1.0 * sigmoid_rampup(iter // 150, 40) with iter the official 1-based step number
  (the official code increments its counter before computing the weight), i.e.
  ``training_iteration + 1`` of the base, which is checkpointed and comes back on ``--c``.

Optimiser (paper): SGD lr 0.01, momentum 0.9, weight decay 1e-4, no Nesterov, constant learning
rate (nnU-Net's PolyLRScheduler with exponent 0, so nnU-Net's per-epoch ``step`` and logging work),
no gradient clipping (official: ``grad_clip = None``; 12 restores nnU-Net's clipping).
Schedule: the official 15,000 iterations = 60 epochs x 250 iterations (nnU-Net's per-epoch
validation and checkpoints in between; ``NNUNET_EXT_*`` short-run variables still apply).

Deep supervision: MC-Net+ has none. ``enable_deep_supervision`` is False, so nnU-Net's targets are
single tensors and its ``set_deep_supervision_enabled`` only flips ``network.decoder.deep_supervision``
(which, in eval mode, chooses all decoders' logits vs the inference output).

Region-based datasets are refused (the method is softmax-based).
"""
from __future__ import annotations

from itertools import permutations
from typing import Sequence

import torch
from torch import nn

from nnunet_ext import compat
from nnunet_ext.architectures.mcnet import MCNet, downsampling_from_plans
from nnunet_ext.trainers.semi_supervised import labeled_part, nnUNetSemiSupervisedTrainer, sigmoid_rampup

__all__ = ["MCNetPlusTrainer", "MCNetDiceLoss", "sharpen", "mutual_consistency_loss", "mcnet_from_plans"]


def sharpen(probabilities: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """P^(1/T) / (P^(1/T) + (1 - P)^(1/T)), element-wise (the paper's sharpening, T = 0.1)."""
    power = 1.0 / temperature
    high = probabilities ** power
    return high / (high + (1.0 - probabilities) ** power)


def mutual_consistency_loss(probabilities: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """sum over ordered pairs i != j of mean((p_i - sharpen(p_j))^2); nothing detached (as official)."""
    if len(probabilities) < 2:
        return probabilities[0].new_zeros(())
    sharpened = [sharpen(p, temperature) for p in probabilities]
    return sum(torch.mean((probabilities[i] - sharpened[j]) ** 2)
               for i, j in permutations(range(len(probabilities)), 2))


class MCNetDiceLoss(nn.Module):
    """1 - soft Dice of the softmax foreground channels over the whole batch (official Binary_dice_loss,
    generalised to the mean over foreground classes); voxels with nnU-Net's ignore label do not count."""

    def __init__(self, ignore_label: int | None = None, ddp: bool = False, eps: float = 1e-8):
        super().__init__()
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        self.ignore_label = ignore_label
        self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x.float(), 1), batch_dice=True,
                                                do_bg=False, smooth=eps, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.ignore_label is not None:
            ignored = target == self.ignore_label
            mask = (~ignored).float()
            target = torch.where(ignored, torch.zeros_like(target), target)
        return 1.0 + self.dice(logits, target, loss_mask=mask)  # nnU-Net's Dice loss is -Dice


def mcnet_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int,
                     num_decoders: int = 3, inference: str = "first") -> MCNet:
    """MCNet for a plans configuration: its channels, classes and (the first 4) pooling strides."""
    patch = list(configuration_manager.patch_size)
    if len(patch) != 3:
        raise ValueError(f"MC-Net+ is a 3D network; this configuration has a {len(patch)}D patch {patch}. "
                         f"Train a 3D configuration (3d_fullres or 3d_lowres).")
    strides = downsampling_from_plans(configuration_manager.pool_op_kernel_sizes)
    return MCNet(input_channels=num_input_channels, num_classes=num_output_channels, strides=strides,
                 num_decoders=num_decoders, inference=inference)


class MCNetPlusTrainer(nnUNetSemiSupervisedTrainer):
    """MC-Net+: three decoders, supervised Dice + mutual consistency on sharpened predictions."""

    supervised_weight = 0.5  # official lamda
    consistency = 1.0
    consistency_rampup = 40.0
    rampup_every = 150  # iterations per ramp-up step
    temperature = 0.1
    grad_clip = None  # official: no gradient clipping

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = 1e-2
        self.momentum = 0.9
        self.weight_decay = 1e-4
        self.num_epochs = 60  # x 250 iterations = the official 15,000
        self.num_iterations_per_epoch = 250

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = False) -> MCNet:
        network = mcnet_from_plans(configuration_manager, num_input_channels, num_output_channels)
        network.decoder.deep_supervision = enable_deep_supervision
        return network

    def initialize(self):
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} trains softmax segmentations (as MC-Net+); this dataset is "
                             f"region-based (dataset.json 'regions_class_order'), which it does not support.")
        super().initialize()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        return optimizer, compat.constant_lr_scheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        """The supervised Dice (also nnU-Net's validation loss, on the inference output)."""
        return MCNetDiceLoss(self.label_manager.ignore_label, ddp=self.is_ddp)

    def consistency_weight(self) -> float:
        """w(t) for the step being taken (official iter_num = steps done + 1)."""
        step = (self.training_iteration + 1) // self.rampup_every
        return self.consistency * sigmoid_rampup(step, self.consistency_rampup)

    def loss_terms(self, outputs: Sequence[torch.Tensor], target: torch.Tensor,
                   labeled_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the decoders' Dice on the labelled part, mutual consistency on all patches)."""
        supervised = sum(self.loss(labeled_part(logits, labeled_count), target) for logits in outputs)
        probabilities = [torch.softmax(logits.float(), 1) for logits in outputs]
        return supervised, mutual_consistency_loss(probabilities, self.temperature)

    def compute_loss(self, outputs, target, labeled_count: int) -> torch.Tensor:
        supervised, consistency = self.loss_terms(outputs, target, labeled_count)
        return self.supervised_weight * supervised + self.consistency_weight() * consistency

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.print_to_log_file(f"MC-Net+: training iteration {self.training_iteration}, consistency weight "
                               f"{self.consistency_weight():.6f}")

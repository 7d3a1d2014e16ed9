"""MCNetPlusTrainer: MC-Net+ (Wu et al., MedIA 2022; ycwu1997/MC-Net) as a semi-supervised nnU-Net v2 trainer.

Network: :class:`nnunet_ext.architectures.mcnet.MCNet`, 3 decoders, built from the configuration's
plans: input channels and classes from nnU-Net, per-level downsampling from the plans' strides
(the first 4 pooling steps, the paper's depth; see ``strides_from_plans``), so nnU-Net's patch
size and anisotropic spacing work with the default ``nnUNetPlans``. 3D configurations only (the
paper's 2D variant is a different, U-Net-based model). Inference uses decoder 1, as the paper.

Batches: the semi-supervised base's 2 labelled + 2 unlabelled patches, one forward pass for all four
(as official: BatchNorm sees both). Loss of one step, as the official ``train_mcnet_3d.py`` (its pieces
are in :mod:`nnunet_ext.losses.semi_supervised`):

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

from typing import Sequence

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.mcnet import MCNet, strides_from_plans
from nnunet_ext.losses.semi_supervised import MCNetDiceLoss, mutual_consistency_loss
from nnunet_ext.trainers.semi_supervised import labeled_part, nnUNetSemiSupervisedTrainer, sigmoid_rampup

__all__ = ["MCNetPlusTrainer", "mcnet_from_plans"]


def mcnet_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int,
                     num_decoders: int = 3, inference: str = "first") -> MCNet:
    """MCNet for a plans configuration: its channels, classes and (the first 4) pooling strides."""
    patch = list(configuration_manager.patch_size)
    if len(patch) != 3:
        raise ValueError(f"MC-Net+ is a 3D network; this configuration has a {len(patch)}D patch {patch}. "
                         f"Train a 3D configuration (3d_fullres or 3d_lowres).")
    strides = strides_from_plans(configuration_manager.pool_op_kernel_sizes)
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
        self.refuse_regions("MC-Net+'s losses are softmax-based")
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

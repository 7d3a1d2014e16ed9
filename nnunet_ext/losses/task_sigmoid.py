"""DoDNet's loss (Zhang et al., CVPR 2021, github.com/jianpengz/DoDNet), also TransDoDNet's: Dice + BCE on
the sigmoid channels of a task's dynamic head.

The official code (``DiceLoss4MOTS`` and ``CELoss4MOTS``) computes, per sample and channel,
``1 - 2 sum(p t) / (sum p + sum t + 1)`` and the voxel mean of the BCE, averages each over the samples
annotating the channel, then over the channels. The channels and the samples that annotate them come
from the label coding of the merged dataset (:class:`nnunet_ext.architectures.dodnet.SigmoidLabelCoding`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nnunet_ext.architectures.dodnet import SigmoidLabelCoding


class DoDNetLoss(nn.Module):
    """Official Dice + BCE over the task's sigmoid channels, computed per sample and channel.

    Dice: ``1 - 2 sum(p t) / (sum p + sum t + 1)`` per sample and channel, BCE: mean over voxels;
    each averaged over the samples annotating the channel, then over the channels (official
    ``DiceLoss4MOTS`` / ``CELoss4MOTS``). Voxels of the merged ``ignore`` label count in neither.
    Only batches of one task reach it from the universal base (``set_task``), but ``tasks`` per
    sample works too."""

    def __init__(self, coding: SigmoidLabelCoding, ignore_value: int | None = None, smooth: float = 1.0):
        super().__init__()
        self.coding, self.ignore_value, self.smooth = coding, ignore_value, smooth
        self.task = 0

    def set_task(self, task_id: int) -> None:
        self.task = int(task_id)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        if tasks is None:
            tasks = torch.full((logits.shape[0],), self.task, dtype=torch.long, device=logits.device)
        channels, valid = self.coding.encode(target, tasks)
        voxels = torch.ones_like(target, dtype=logits.dtype) if self.ignore_value is None \
            else (target != self.ignore_value).to(logits.dtype)
        logits, channels = logits.float().flatten(2), channels.flatten(2)
        voxels = voxels.float().flatten(2)
        probabilities = torch.sigmoid(logits) * voxels
        intersection = (probabilities * channels).sum(2)
        dice = 1 - 2 * intersection / (probabilities.sum(2) + (channels * voxels).sum(2) + self.smooth)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, channels, reduction="none")
        bce = (bce * voxels).sum(2) / voxels.sum(2).clamp(min=1)
        weight = valid.to(logits.dtype)
        per_channel = ((dice + bce) * weight).sum(0) / weight.sum(0).clamp(min=1)
        return per_channel[weight.sum(0) > 0].mean()

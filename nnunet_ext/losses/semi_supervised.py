"""The losses of the semi-supervised methods: MC-Net+ (Wu et al., MedIA 2022, github.com/ycwu1997/MC-Net)
and LeFeD (github.com/maxwell0027/LeFeD), as their official training scripts compute them.

* MC-Net+: :func:`sharpen`, :func:`mutual_consistency_loss` and :class:`MCNetDiceLoss` (official
  ``train_mcnet_3d.py``; how the trainer combines them: :mod:`nnunet_ext.trainers.mcnet`);
* LeFeD: :func:`official_dice_loss` and :class:`LeFeDLoss`, one pass's loss (official ``train.py``;
  the three passes per batch: :mod:`nnunet_ext.trainers.lefed`).

Both official codes are binary; for more classes each Dice is the mean over the foreground classes,
and voxels of nnU-Net's ignore label are left out.
"""
from __future__ import annotations

from itertools import permutations
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from nnunet_ext import compat

if TYPE_CHECKING:
    from nnunet_ext.architectures.lefed import LeFeDOutput

# --- MC-Net+ -------------------------------------------------------------------------------------


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
        self.ignore_label = ignore_label
        self.dice = compat.soft_dice_loss_class()(apply_nonlin=lambda x: torch.softmax(x.float(), 1),
                                                  batch_dice=True, do_bg=False, smooth=eps, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.ignore_label is not None:
            ignored = target == self.ignore_label
            mask = (~ignored).float()
            target = torch.where(ignored, torch.zeros_like(target), target)
        return 1.0 + self.dice(logits, target, loss_mask=mask)  # nnU-Net's Dice loss is -Dice


# --- LeFeD ---------------------------------------------------------------------------------------

LEFED_SIDE_WEIGHTS = (0.8, 0.6, 0.4, 0.2, 0.1)  # full-resolution side head first (official los1..los5)
LEFED_DICE_SMOOTH = 1e-5


def official_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """LeFeD's official ``dice_loss`` per foreground class (squared sums over the whole batch), averaged
    over classes 1..C-1. ``target``: (B, 1, ...) label map; ``valid``: (B, 1, ...) mask of voxels to count."""
    losses = []
    for c in range(1, probabilities.shape[1]):
        p = probabilities[:, c:c + 1]
        t = (target == c).to(p.dtype)
        if valid is not None:
            p, t = p * valid, t * valid
        dice = (2 * (p * t).sum() + LEFED_DICE_SMOOTH) / ((p * p).sum() + (t * t).sum() + LEFED_DICE_SMOOTH)
        losses.append(1 - dice)
    return torch.stack(losses).mean()


class LeFeDLoss:
    """One LeFeD pass's loss, as the official code: Dice(decoder 1) + Dice(decoder 2) on the labelled part
    + side-output weights x side Dice + consistency weight x MSE(softmax 1, softmax 2) on all patches,
    nothing detached; ``terms`` gives the parts for logging and tests."""

    def __init__(self, ignore_label: int | None = None, side_weights: Sequence[float] = LEFED_SIDE_WEIGHTS,
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

"""SurgicalSAM's losses for ClassSAM (``nnunet_ext.architectures.class_sam``): per-class sigmoid Dice
and the contrastive prototype loss, plus a BCE term for the classes a patch does not contain.

Official code (github.com/wenxi-yue/SurgicalSAM, ``train.py``, ``loss.py``): ``loss = DiceLoss()(pred,
mask) + NTXentLoss(temperature=0.07)(prototypes, labels 1..K, ref_emb=class_embeddings,
ref_labels=class_ids)``, where each training sample is one (frame, present class) pair and

* Dice is MMSegmentation's V-Net Dice on the sigmoid of that class's mask logits
  (``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)``, eps 1e-3), averaged over the pairs;
* the class embedding of a pair is the mean frozen SAM image embedding over the cells of the
  64x64 embedding grid the class's mask covers; the NT-Xent loss takes each prototype as anchor,
  the class embeddings of its class as positives and those of other classes as negatives
  (cosine similarity / temperature), averaged over the positive pairs.

Here one patch holds several classes, and nnU-Net's predictor prompts every class on every
patch, so: the Dice term runs over the (sample, class) pairs whose class is present (the official
pairs), and the contrastive term over the class embeddings of those pairs, as the official code.
The official protocol only ever prompts classes that are present (also in its validation), so it
never has to output an empty mask; nnU-Net's inference does, so a per-pixel BCE over every class
channel (present or not) is added (``bce_weight``, default 1) - the one deviation. Pixels of
nnU-Net's ignore label count in no term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.architectures.class_sam import sam_frame


def class_masks(target: torch.Tensor, num_classes: int, ignore_label: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """nnU-Net label patch ``(B, 1, H, W)`` -> foreground one-hot ``(B, K, H, W)`` (classes 1..K) and the
    mask of annotated pixels ``(B, 1, H, W)``."""
    labels = target[:, :1].long()
    valid = torch.ones_like(labels, dtype=torch.float32) if ignore_label is None else (labels != ignore_label).float()
    classes = torch.arange(1, num_classes + 1, device=target.device).view(1, -1, 1, 1)
    return (labels == classes).float() * valid, valid


def sigmoid_dice(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Official V-Net Dice loss per (sample, class): ``(B, K)``."""
    probabilities = torch.sigmoid(logits.float()) * valid
    overlap = (probabilities * masks).flatten(2).sum(-1)
    denominator = (probabilities ** 2).flatten(2).sum(-1) + eps + (masks ** 2).flatten(2).sum(-1) + eps
    return 1 - 2 * overlap / denominator


def class_embeddings(image_embeddings: torch.Tensor, masks: torch.Tensor, image_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean image embedding over the embedding cells each present class covers.

    ``image_embeddings`` ``(B, D, E, E)`` of patches resized into SAM's ``image_size`` frame,
    ``masks`` ``(B, K, H, W)`` at patch size. Returns ``(embeddings (N, D), class indices (N,))``,
    one row per (sample, present class), classes counted from 0.
    """
    embedding = image_embeddings.shape[-1]
    frame = sam_frame(masks.shape[-2], masks.shape[-1], image_size)
    cells = tuple(max(1, round(f * embedding / image_size)) for f in frame)
    covered = F.adaptive_avg_pool2d(masks, cells)  # share of each cell the class covers
    covered = F.pad(covered, (0, embedding - cells[1], 0, embedding - cells[0])) > 0
    counts = covered.flatten(2).sum(-1)  # (B, K)
    sums = torch.einsum("bkxy,bdxy->bkd", covered.to(image_embeddings.dtype), image_embeddings)
    present = counts > 0
    means = sums[present] / counts[present].unsqueeze(-1).to(sums.dtype)
    labels = torch.nonzero(present)[:, 1]
    return means, labels


def contrastive_prototype_loss(prototypes: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                               temperature: float = 0.07) -> torch.Tensor:
    """NT-Xent with the prototypes as anchors (official ``NTXentLoss(temperature=0.07)(prototypes,
    ..., ref_emb=class_embeddings, ref_labels=class_ids)``), mean over positive pairs; 0 without pairs."""
    if embeddings.shape[0] == 0:
        return prototypes.sum() * 0.0
    similarity = F.normalize(prototypes.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).t() / temperature
    positive = labels.view(1, -1) == torch.arange(prototypes.shape[0], device=labels.device).view(-1, 1)  # (K, N)
    negatives = torch.logsumexp(similarity.masked_fill(positive, float("-inf")), dim=1, keepdim=True)  # (K, 1)
    per_pair = torch.logaddexp(similarity, negatives.expand_as(similarity)) - similarity
    return per_pair[positive].mean()


class ClassSAMLoss(nn.Module):
    """``dice + bce_weight * bce + contrastive`` for ClassSAM's logits ``(B, 1 + K, H, W)``.

    ``forward(logits, target)`` (what nnU-Net's validation step calls) gives the segmentation part;
    with ``image_embeddings`` and ``prototypes`` (the trainer's step) the contrastive part is added.
    """

    def __init__(self, image_size: int, ignore_label: int | None = None, temperature: float = 0.07,
                 bce_weight: float = 1.0, contrastive_weight: float = 1.0):
        super().__init__()
        self.image_size, self.ignore_label, self.temperature = image_size, ignore_label, temperature
        self.bce_weight, self.contrastive_weight = bce_weight, contrastive_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, image_embeddings: torch.Tensor | None = None,
                prototypes: torch.Tensor | None = None) -> torch.Tensor:
        foreground = logits[:, 1:].float()
        masks, valid = class_masks(target, foreground.shape[1], self.ignore_label)
        present = masks.flatten(2).sum(-1) > 0
        dice = sigmoid_dice(foreground, masks, valid)[present]
        loss = dice.mean() if dice.numel() else foreground.sum() * 0.0
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(foreground, masks, weight=valid.expand_as(masks), reduction="sum")
            loss = loss + self.bce_weight * bce / (valid.sum() * foreground.shape[1]).clamp(min=1)
        if image_embeddings is not None and prototypes is not None and self.contrastive_weight:
            embeddings, labels = class_embeddings(image_embeddings.float(), masks, self.image_size)
            loss = loss + self.contrastive_weight * contrastive_prototype_loss(prototypes, embeddings, labels,
                                                                               self.temperature)
        return loss

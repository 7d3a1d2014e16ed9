"""Partial-label loss: a task's loss sees only the classes that task annotates.

In a merged dataset a task's label map says 0 for "background or a structure this task does not
annotate" (see :mod:`nnunet_ext.tasks.task_map`). Treating those voxels as background would teach
the network that, e.g., the kidney is background whenever a liver-only dataset is sampled. So the
loss of a batch of task ``t`` is nnU-Net's loss on the logits of background + the task's
annotated classes only (softmax over that subset, Dice over its foreground), with the target
re-indexed into that subset. Unannotated classes get exactly zero gradient from the batch; a
voxel labelled 0 only tells the network "none of this task's structures". This is the
per-task output slicing of UniSeg (``task_class``) on a shared merged label space.

The task is set per batch by the trainer (``set_task``), like the network's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PartialLabelLoss(nn.Module):
    """Wraps a label loss (logits ``(B, C, ...)``, target ``(B, 1, ...)`` class values) built with
    ``ignore_label=self.ignore_index``."""

    def __init__(self, loss: nn.Module, annotated_classes: Sequence[Sequence[bool]], ignore_value: int | None,
                 ignore_index: int):
        super().__init__()
        self.loss = loss
        mask = torch.tensor([[bool(v) for v in row] for row in annotated_classes], dtype=torch.bool)
        num_classes = mask.shape[1]
        if ignore_index < num_classes:
            raise ValueError(f"ignore_index must not be a class index (>= {num_classes}); got {ignore_index}")
        self.ignore_index = ignore_index
        # per task: merged value -> index in the task's subset; unannotated values (and ignore) -> ignore_index
        lut_size = max(num_classes, (ignore_value or 0) + 1)
        luts = torch.full((mask.shape[0], lut_size), ignore_index, dtype=torch.long)
        for task, row in enumerate(mask):
            kept = torch.nonzero(row).flatten()
            luts[task, kept] = torch.arange(len(kept))
        self.register_buffer("annotated_classes", mask, persistent=False)
        self.register_buffer("target_luts", luts, persistent=False)
        self.task = 0

    def set_task(self, task_id: int) -> None:
        self.task = int(task_id)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = torch.nonzero(self.annotated_classes[self.task]).flatten()
        restricted = output.index_select(1, kept.to(output.device))
        lut = self.target_luts[self.task].to(target.device)
        remapped = lut[target.long().clamp(min=0, max=lut.numel() - 1)]
        return self.loss(restricted, remapped)

"""Task conditioning of a network: which task the current batch (or case) belongs to.

nnU-Net calls ``network(x)``, in training and in its sliding-window predictor, so the task of
the input cannot be an argument. Every batch of a task-aware trainer comes from one task (and
every case predicted by ``nnunet-ext predict --task`` belongs to one task), so the trainer or
the predictor sets it on the network before the forward pass: ``network.set_task(task_id)``.
The task lives in a non-persistent buffer (on the network's device, not in state dicts, no
``torch.compile`` recompilation per task).

In evaluation mode the logits of merged classes the task does not annotate are pushed to the
``MASK_MARGIN`` below the task's own classes at every voxel, so nnU-Net's softmax/argmax (validation, final validation,
prediction) only choose among the task's own structures. Training losses pick the task's
channels themselves (:mod:`nnunet_ext.losses.partial_label`).

A network built without a task set refuses to run with a message that says how to predict
(``nnunet-ext predict --task NAME``, or ``NNUNET_EXT_TASK`` for the stock commands).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

TASK_VARIABLE = "NNUNET_EXT_TASK"
# A masked class's logit sits this far below the lowest logit the task's own classes have at that
# voxel: softmax gives it < 1e-13 and argmax never picks it, while values stay on the scale of real
# logits, so nnU-Net's fp16 sliding-window sums (gaussian weights up to 10, overlapping tiles)
# cannot overflow to inf (the predictor aborts on inf).
MASK_MARGIN = 30.0


def is_masked(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per voxel and class (``keep``: bool per class): is this logit a masked one? For tests and checks."""
    shape = (1, -1, *([1] * (logits.ndim - 2)))
    kept_min = logits.masked_fill(~keep.view(shape), float("inf")).amin(dim=1, keepdim=True)
    return (logits <= kept_min - MASK_MARGIN + 1e-3) & ~keep.view(shape)


class TaskNotSetError(RuntimeError):
    pass


class TaskConditioning(nn.Module):
    """Mixin for ``nn.Module`` networks: ``set_task`` plus the per-task output mask.

    Call :meth:`init_task_conditioning` in ``__init__`` after ``super().__init__()``.
    ``annotated_classes[t][c]`` says whether task ``t`` annotates merged class ``c`` (background
    is always annotated); ``None`` means every task annotates every class (no masking).
    """

    def init_task_conditioning(self, num_tasks: int, annotated_classes: Sequence[Sequence[bool]] | None,
                               num_classes: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if annotated_classes is None:
            annotated_classes = [[True] * num_classes for _ in range(num_tasks)]
        mask = torch.tensor([[bool(v) for v in row] for row in annotated_classes], dtype=torch.bool)
        if tuple(mask.shape) != (num_tasks, num_classes):
            raise ValueError(f"annotated_classes must be {num_tasks} tasks x {num_classes} classes, "
                             f"got {tuple(mask.shape)}")
        self.num_tasks = num_tasks
        self.register_buffer("annotated_classes", mask, persistent=False)
        self.register_buffer("task_index", torch.zeros((), dtype=torch.long), persistent=False)
        self.task_is_set = False

    def set_task(self, task_id: int) -> None:
        task_id = int(task_id)
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task id {task_id} is out of range: this network has {self.num_tasks} tasks "
                             f"(0..{self.num_tasks - 1})")
        self.task_index.fill_(task_id)
        self.task_is_set = True

    @property
    def current_task(self) -> int:
        self.require_task()
        return int(self.task_index.item())

    def require_task(self) -> None:
        if not self.task_is_set:
            raise TaskNotSetError(
                f"{type(self).__name__} was trained on several tasks (datasets) and needs to know the task of its "
                f"input. Predict with `nnunet-ext predict --task NAME ...` (same flags as nnUNetv2_predict; it also "
                f"writes labels in the task's own label values), or set {TASK_VARIABLE}=NAME for the stock "
                f"nnUNetv2_predict (labels then stay in the merged label space).")

    def mask_unannotated(self, logits: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """In eval mode: logits of classes the task does not annotate -> ``MASK_MARGIN`` below its lowest own one.

        ``task``: a long tensor, one task id for the batch (0-d) or one per sample (``(B,)``); None reads
        the task set with :meth:`set_task`. A tensor, not a Python int, so a new task neither syncs the
        GPU nor recompiles a compiled network."""
        if self.training:
            return logits
        keep = self.annotated_classes[(self.task_index if task is None else task).view(-1)]
        keep = keep.view(keep.shape[0], -1, *([1] * (logits.ndim - 2)))
        kept_min = logits.masked_fill(~keep, float("inf")).amin(dim=1, keepdim=True)
        return torch.where(keep, logits, kept_min - MASK_MARGIN)

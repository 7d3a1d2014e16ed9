"""TransDoDNetTrainer: TransDoDNet (TPAMI 2023, github.com/jianpengz/DoDNet, ``TransDoD``) trained by nnU-Net v2.

Everything DoDNet-specific is :class:`nnunet_ext.trainers.dodnet.DoDNetTrainer`'s (merged
datasets, sigmoid label coding with nested classes, :class:`DoDNetLoss` Dice + BCE, per-task
validation, no deep supervision - the official ``deep_supervision=False``). This trainer changes:

* network: :class:`nnunet_ext.architectures.transdodnet.TransDoDNet` (paper depth and widths, the
  plans' strides via its ``strides_from_plans``);
* optimiser (official ``TransDoD/train.py`` defaults): AdamW lr 2e-4, weight decay 1e-4; the
  official two parameter groups (transformer / rest) share one lr (``lr_tr_mult`` 1.0), so one
  group here;
* schedule: per epoch, linear warm-up from 1% of the lr over the first 10 epochs, then poly 0.9
  (official ``adjust_learning_rate``): :class:`WarmupPolyLRScheduler`;
* gradient-norm clipping at 0.1 (official) instead of nnU-Net's 12: the base trainer's
  ``grad_clip`` (its step is nnU-Net's, AMP with fp16 autocast + GradScaler on CUDA included).
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_ext.architectures.transdodnet import TransDoDNet, strides_from_plans
from nnunet_ext.trainers.dodnet import DoDNetTrainer, build_dynamic_head_network


class WarmupPolyLRScheduler(_LRScheduler):
    """``lr(e) = lr0 * (0.01 + 0.99 * e / warmup)`` for ``e < warmup``, else
    ``lr0 * (1 - e / max_steps) ** exponent`` (official ``adjust_learning_rate``); nnU-Net calls
    ``step(epoch)`` at every epoch start, as for its ``PolyLRScheduler``."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup: int = 10, start_factor: float = 0.01,
                 exponent: float = 0.9, current_step: int | None = None):
        self.optimizer, self.initial_lr, self.max_steps = optimizer, initial_lr, max_steps
        self.warmup, self.start_factor, self.exponent = warmup, start_factor, exponent
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.initial_lr * (self.start_factor + (1 - self.start_factor) * step / self.warmup)
        return self.initial_lr * max(0.0, 1 - step / self.max_steps) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


class TransDoDNetTrainer(DoDNetTrainer):
    """TransDoDNet on a merged dataset: DoDNet's data, coding and loss; the official AdamW schedule."""

    grad_clip = 0.1  # official clip_grad_norm_(..., 0.1); nnU-Net: 12
    warmup_epochs = 10

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.weight_decay = 2e-4, 1e-4

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        return build_dynamic_head_network(TransDoDNet, strides_from_plans, plans_manager, configuration_manager,
                                          num_input_channels, num_output_channels, enable_deep_supervision,
                                          plan_keywords=("axis_order",))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

"""UniSegTrainer: UniSeg (Ye et al., MICCAI 2023, github.com/yeerwen/UniSeg) trained by nnU-Net v2.

One model over many partially labelled datasets merged with ``nnunet-ext merge``: the data and
loss layer is :class:`trainers.universal.nnUNetUniversalTrainer` (single-task batches, partial-label
Dice+CE, per-task validation, task-aware prediction); this trainer adds the network,
:class:`nnunet_ext.architectures.uniseg.UniSeg`, built from the merged dataset's nnU-Net plans
(the plans' U-Net topology and patch size, the universal prompt sized to the bottleneck, one
input conv per channel count among the tasks) and the official schedule:

* tasks sampled uniformly and ``50 x number of tasks`` iterations per epoch (official: 550 = 50
  per task for 11 tasks), 1000 epochs, batch and patch from the plans (official 2, 64x192x192);
* SGD lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, poly 0.9, Dice+CE with nnU-Net's
  deep-supervision weights (official: [1, .5, .25, .125, 0] normalised): nnU-Net's defaults,
  pinned by the tests.

Output channels are the merged label space; the official shares one 4-channel head sliced per
task (``task_class``), here each task's loss and predictions use that task's merged classes
(the same per-task slicing on a shared label space). The universal prompt and the task map are
network weights / checkpoint state, so they come back on ``--c`` and at inference.
"""
from __future__ import annotations

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.uniseg import UniSeg
from nnunet_ext.trainers.universal import (annotated_classes, apply_default_task, nnUNetUniversalTrainer,
                                           task_map_from_plans)

UNISEG_CLASS_NAME = f"{UniSeg.__module__}.{UniSeg.__qualname__}"
ITERATIONS_PER_TASK = 50


def uniseg_arch_kwargs(plans_manager, configuration_manager) -> dict:
    """UniSeg's keyword arguments: the plans' U-Net keywords plus patch size and the tasks."""
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    if "n_conv_per_stage" not in kwargs:
        raise ValueError(f"UniSegTrainer builds UniSeg from nnU-Net's PlainConvUNet plans (e.g. nnUNetPlans); this "
                         f"configuration names {configuration_manager.network_arch_class_name}. Train with "
                         f"-p nnUNetPlans.")
    task_map = task_map_from_plans(plans_manager)
    kwargs.update(patch_size=[int(p) for p in configuration_manager.patch_size],
                  task_channels=[task.num_channels for task in task_map],
                  annotated_classes=annotated_classes(task_map))
    return kwargs


class UniSegTrainer(nnUNetUniversalTrainer):
    """UniSeg on a merged dataset: universal prompt, FUSE, per-channel-count stems, partial labels."""

    task_weighting = "uniform"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = ITERATIONS_PER_TASK * len(self.task_map)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        kwargs = uniseg_arch_kwargs(plans_manager, configuration_manager)
        network = compat.network_from_plans(UNISEG_CLASS_NAME, kwargs,
                                            configuration_manager.network_arch_init_kwargs_req_import,
                                            num_input_channels, num_output_channels, enable_deep_supervision)
        apply_default_task(network, task_map_from_plans(plans_manager))
        return network

"""DoDNetTrainer: DoDNet (Zhang et al., CVPR 2021, github.com/jianpengz/DoDNet) trained by nnU-Net v2.

One model over partially labelled datasets merged with ``nnunet-ext merge``; the data layer is
:class:`trainers.universal.nnUNetUniversalTrainer` (single-task batches, per-task validation,
task map in plans and checkpoints, ``nnunet-ext predict --task``). This trainer changes:

* network: :class:`nnunet_ext.architectures.dodnet.DoDNet` (paper depth and widths, the plans'
  strides via ``strides_from_plans``) with a :class:`SigmoidLabelCoding` of the merged label
  space: training outputs are per-task sigmoid logits, eval-mode outputs merged-class scores
  whose argmax is the paper's rule, so nnU-Net's validation and predictor work unchanged;
* loss: :class:`nnunet_ext.losses.task_sigmoid.DoDNetLoss`, the official Dice + BCE on the task's
  sigmoid channels (channels the task lacks excluded), no deep supervision
  (``enable_deep_supervision = False``: official);
* schedule (official README): SGD lr 1e-2, momentum 0.99, Nesterov, NO weight decay, poly 0.9,
  1000 epochs x 250 iterations; batch and patch from the plans (official 2, 64x192x192).

Nested classes ([organ incl. tumour, tumour] in the paper) are declared by ``nested_labels``
({child: parent} merged label names; a subclass attribute) or ``NNUNET_EXT_NESTED_LABELS=
"tumour:liver,..."`` for the stock ``nnUNetv2_train``; they are stored in the plans saved with
the model (key ``nnunet_ext_dodnet``) so inference rebuilds the same coding.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from nnunet_ext.architectures.dodnet import DoDNet, SigmoidLabelCoding, strides_from_plans
from nnunet_ext.losses.task_sigmoid import DoDNetLoss
from nnunet_ext.tasks.task_map import TaskMap
from nnunet_ext.trainers.universal import _unwrap, apply_default_task, nnUNetUniversalTrainer, task_map_from_plans

DODNET_PLANS_KEY = "nnunet_ext_dodnet"
NESTED_VARIABLE = "NNUNET_EXT_NESTED_LABELS"


def parse_nested(text: str) -> dict[str, str]:
    """``"lesion:liver, tumour:kidney"`` -> {"lesion": "liver", "tumour": "kidney"} (child: parent)."""
    nested = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        child, sep, parent = item.partition(":")
        if not sep or not child.strip() or not parent.strip():
            raise ValueError(f"{NESTED_VARIABLE}: {item!r} is not CHILD:PARENT (e.g. lesion:liver).")
        nested[child.strip()] = parent.strip()
    return nested


def coding_from_plans(plans_manager) -> SigmoidLabelCoding:
    nested = plans_manager.plans.get(DODNET_PLANS_KEY, {}).get("nested_labels", {})
    return SigmoidLabelCoding(task_map_from_plans(plans_manager), nested)


def build_dynamic_head_network(network_class, strides_rule, plans_manager, configuration_manager,
                               num_input_channels: int, num_output_channels: int, enable_deep_supervision: bool,
                               plan_keywords: tuple[str, ...] = ()):
    """DoDNet or TransDoDNet from a merged dataset's plans: task map and label coding from the plans,
    strides from the plans' U-Net (``strides_rule``), the default task from ``NNUNET_EXT_TASK``.

    ``plan_keywords``: constructor keywords of the network that a user may set in the configuration's
    ``architecture.arch_kwargs`` (e.g. TransDoDNet's ``axis_order``, needed for official weights);
    absent ones keep the network's default."""
    coding = coding_from_plans(plans_manager)
    task_map: TaskMap = task_map_from_plans(plans_manager)
    if num_output_channels != coding.num_classes:
        raise ValueError(f"nnU-Net asks for {num_output_channels} outputs, the merged label space has "
                         f"{coding.num_classes} classes")
    strides = strides_rule(configuration_manager.network_arch_init_kwargs["strides"])
    arch_kwargs = configuration_manager.network_arch_init_kwargs
    chosen = {key: arch_kwargs[key] for key in plan_keywords if key in arch_kwargs}
    network = network_class(num_input_channels, len(task_map), coding.head_channels, strides=strides, coding=coding,
                            deep_supervision=enable_deep_supervision, **chosen)
    apply_default_task(network, task_map)
    return network


class DoDNetTrainer(nnUNetUniversalTrainer):
    """DoDNet on a merged dataset: dynamic per-task heads, sigmoid Dice+BCE, official schedule."""

    #: {child label: parent label} merged names whose child lies inside the parent (paper: tumour in organ)
    nested_labels: Mapping[str, str] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr, self.weight_decay = 1e-2, 0.0
        self.num_epochs, self.num_iterations_per_epoch = 1000, 250
        text = os.environ.get(NESTED_VARIABLE, "").strip()
        nested = parse_nested(text) if text else dict(self.nested_labels)
        SigmoidLabelCoding(self.task_map, nested)  # refuse bad names or cycles now, not at the first batch
        self.plans_manager.plans[DODNET_PLANS_KEY] = {"nested_labels": nested}

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        return build_dynamic_head_network(DoDNet, strides_from_plans, plans_manager, configuration_manager,
                                          num_input_channels, num_output_channels, enable_deep_supervision)

    def _build_loss(self):
        return DoDNetLoss(coding_from_plans(self.plans_manager), self.task_map.ignore_value)

    def set_task(self, task_id: int) -> None:
        super().set_task(task_id)
        for module in self.loss.modules():
            if isinstance(module, DoDNetLoss):
                module.set_task(task_id)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's step on the eval-mode class scores (its argmax gives the pseudo Dice); the loss
        is computed on the sigmoid logits of the same forward pass, which the network keeps for it."""
        network, loss = _unwrap(self.network), self.loss
        network.keep_head_logits = True
        self.loss = _OnHeadLogits(loss, network)
        try:
            return super().validation_step(batch)
        finally:
            self.loss = loss
            network.keep_head_logits, network.last_head_logits = False, None


class _OnHeadLogits(nn.Module):
    """The loss applied to the network's kept sigmoid logits instead of the class scores it returned."""

    def __init__(self, loss: nn.Module, network: DoDNet):
        super().__init__()
        self.loss = loss
        self._network = (network,)  # a tuple: not registered as a submodule

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(self._network[0].last_head_logits, target)

"""CoTrTrainer: CoTr (Xie et al., MICCAI 2021, github.com/YtongXie/CoTr) trained by nnU-Net v2.

Network: :class:`nnunet_ext.architectures.cotr.CoTr`. Two ways to get its configuration:

* plans from :class:`nnunet_ext.plans.cotr.CoTrPlanner` (``-p nnUNetPlans_CoTr``), whose
  3d_fullres configuration names the CoTr class and its ``arch_kwargs``: built from them with
  nnU-Net's ``get_network_from_plans``;
* any other 3D plans, e.g. nnU-Net's default ``nnUNetPlans`` (``-tr CoTrTrainer`` alone): the
  paper's widths, the plans' patch size, and strides derived from the plans'
  ``pool_op_kernel_sizes`` (:func:`strides_from_pool_op_kernel_sizes`).

Schedule (paper, official ``nnUNetTrainerV2_ResTrans``): SGD lr 1e-2, momentum 0.99, Nesterov,
weight decay 3e-5, poly 0.9 per epoch, 1000 epochs x 250 iterations, gradient-norm clipping at 12.
nnU-Net v2's ``nnUNetTrainer`` already uses exactly these (``configure_optimizers`` with
``PolyLRScheduler`` exponent 0.9, ``clip_grad_norm_(..., 12)`` in ``train_step``), so nothing is
overridden for them; the tests pin the values. Data augmentation is nnU-Net v2's default, the
successor of the v1 "moreDA" the official trainer used (rotation +-30 deg, scale 0.7-1.4, no
elastic deformation).

Deep supervision: CoTr returns ``[result, ds_0, ds_1, ds_2]`` at scales ``[1,1,1]``,
``1/strides[0]``, ``1/(strides[0]*strides[1])``, ... (``CoTr.deep_supervision_scales``) - not
nnU-Net's halving pyramid (``ds_0`` keeps the full z resolution with a (1,2,2) stem). The trainer's
``_get_deep_supervision_scales`` returns CoTr's scales, computed from the plans without building
the network, so nnU-Net's target downsampling matches the outputs. Loss weights: the official
trainer computed nnU-Net v1's weights ``1/2^i`` over the *U-Net plans'* pooling count (5 for
BCV), zeroed the last (index 4) and normalised, then applied them to CoTr's 4 outputs - so all
four outputs are used, with weights ``[8, 4, 2, 1] / 15``. That is what this trainer does
(``1/2^i`` over CoTr's outputs, none zeroed, normalised to sum 1), for any number of outputs.
"""
from __future__ import annotations

import inspect
import pydoc

import numpy as np

from nnunet_ext import compat
from nnunet_ext.architectures.cotr import CoTr, deep_supervision_scales_for_strides
from nnunet_ext.architectures.cotr import strides_from_plans as strides_from_pool_op_kernel_sizes
from nnunet_ext.plans.cotr import COTR_CLASS_NAME
from nnunet_ext.trainers.base import nnUNetExtTrainer

_COTR_DEFAULTS = {name: p.default for name, p in inspect.signature(CoTr).parameters.items()
                  if p.default is not inspect.Parameter.empty}


def deep_supervision_weights(n_outputs: int) -> np.ndarray:
    """Official CoTr loss weights: ``1/2^i`` for every output, normalised (4 outputs: [8, 4, 2, 1] / 15)."""
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    return weights / weights.sum()


def names_cotr(configuration_manager) -> bool:
    """Whether the configuration's network class is CoTr (or a subclass)."""
    located = pydoc.locate(configuration_manager.network_arch_class_name)
    return isinstance(located, type) and issubclass(located, CoTr)


def cotr_arch_kwargs(configuration_manager) -> dict:
    """CoTr's keyword arguments for a configuration: its own arch_kwargs, or derived from nnU-Net's plans."""
    if names_cotr(configuration_manager):
        return dict(configuration_manager.network_arch_init_kwargs)
    patch_size = [int(p) for p in configuration_manager.patch_size]
    if len(patch_size) != 3:
        raise ValueError(f"CoTr is a 3D network; this configuration has a {len(patch_size)}D patch size "
                         f"{patch_size}. Train CoTrTrainer on a 3d configuration (3d_fullres).")
    return {"patch_size": patch_size,
            "strides": strides_from_pool_op_kernel_sizes(configuration_manager.pool_op_kernel_sizes)}


class CoTrTrainer(nnUNetExtTrainer):
    """CoTr with the paper's schedule (nnU-Net's defaults) and CoTr's deep supervision."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        if names_cotr(configuration_manager):
            return compat.network_from_plans(configuration_manager.network_arch_class_name,
                                             configuration_manager.network_arch_init_kwargs,
                                             configuration_manager.network_arch_init_kwargs_req_import,
                                             num_input_channels, num_output_channels, enable_deep_supervision)
        return compat.network_from_plans(COTR_CLASS_NAME, cotr_arch_kwargs(configuration_manager), (),
                                         num_input_channels, num_output_channels, enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        strides = cotr_arch_kwargs(self.configuration_manager).get("strides", _COTR_DEFAULTS["strides"])
        return deep_supervision_scales_for_strides(strides)

    def _build_loss(self):
        loss = super()._build_loss()  # nnU-Net's Dice+CE (regions, ignore label, batch dice) in its DS wrapper
        if self.enable_deep_supervision:
            weights = deep_supervision_weights(len(self._get_deep_supervision_scales()))
            loss = compat.deep_supervision_loss(loss.loss, weights)
        return loss

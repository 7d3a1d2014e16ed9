"""BANetTrainer: BA-Net (boundary-aware network, ShishuaiHu/BA-Net, KiPA22 2nd place) trained by nnU-Net v2.

Network: :class:`nnunet_ext.architectures.banet.BANet`, built from the configuration's own
plans: nnU-Net's ``PlainConvUNet`` plans (default ``nnUNetPlans``) or residual-encoder plans
(``nnUNetResEncUNet*Plans``) give BA-Net with exactly that encoder and decoder topology, plus the
boundary decoder; plans that already name BANet are used as they are. Patch and batch size are
nnU-Net's, as in the paper (KiPA22 3d_fullres; AMOS22 3d_lowres = BA-Net-L, 3d_fullres =
BA-Net-H), 2d works as well.

Loss (official ``BANetV2Trainer``): nnU-Net's segmentation loss (Dice+CE, or Dice+BCE for
regions; ignore label as nnU-Net) + Dice+CE on the boundary heads (batch dice as the plans, no
background, ignored voxels skipped), 1:1, both with nnU-Net's deep-supervision weights. Boundary
targets are made on the training device from the augmented label patches that nnU-Net's data
pipeline delivers (:mod:`nnunet_ext.losses.boundary`). The official code's optional
boundary-consistency term was disabled there (``cons_cond = False``) and is not included.

Schedule: nnU-Net's (SGD 1e-2, momentum 0.99, Nesterov, poly, 1000 x 250), unchanged. The
official runs used a 4-fold split; nnU-Net v2 reads the split from ``splits_final.json``, so write
a 4-fold one there to reproduce that (see the docs, methods/banet-training).

BA-Net supervises both decoders at every scale, so deep supervision cannot be switched off for
training (nnU-Net's inference switches it off, which works).
"""
from __future__ import annotations

import pydoc

import torch

from nnunet_ext import compat
from nnunet_ext.architectures.banet import BANet
from nnunet_ext.losses.boundary import BOUNDARY_IGNORE, BoundaryAwareLoss, BoundaryTargets
from nnunet_ext.trainers.base import nnUNetExtTrainer

BANET_CLASS_NAME = f"{BANet.__module__}.{BANet.__qualname__}"
_SOURCE_ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")


def banet_architecture(configuration_manager) -> tuple[str, dict, tuple]:
    """(class path, arch kwargs, kwargs needing import) of BA-Net for a plans configuration."""
    class_name = configuration_manager.network_arch_class_name
    located = pydoc.locate(class_name)
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    requires_import = tuple(configuration_manager.network_arch_init_kwargs_req_import)
    if isinstance(located, type) and issubclass(located, BANet):
        return class_name, kwargs, requires_import
    if not (isinstance(located, type) and any(base.__name__ in _SOURCE_ARCHITECTURES for base in located.__mro__)):
        raise ValueError(f"BANetTrainer builds BA-Net from plans for nnU-Net's PlainConvUNet or ResidualEncoderUNet "
                         f"(e.g. nnUNetPlans); this configuration names {class_name!r}. Train with -p nnUNetPlans "
                         f"(or a ResEnc plans identifier).")
    return BANET_CLASS_NAME, kwargs, requires_import


class BANetTrainer(nnUNetExtTrainer):
    """BA-Net on nnU-Net's plans: boundary decoder, boundary-modulated segmentation decoder, 1:1 loss."""

    #: False: boundaries of the full-resolution target, downsampled per scale (official);
    #: True: boundaries of each scale's own downsampled label target.
    boundary_targets_from_each_scale = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        class_name, kwargs, requires_import = banet_architecture(configuration_manager)
        return compat.network_from_plans(class_name, kwargs, requires_import, num_input_channels,
                                         num_output_channels, enable_deep_supervision)

    def initialize(self):
        if not self.enable_deep_supervision:
            raise RuntimeError(f"{type(self).__name__}: BA-Net trains its boundary and segmentation heads at every "
                               f"scale, so deep supervision cannot be disabled (enable_deep_supervision=False).")
        super().initialize()

    def _build_loss(self):
        segmentation = super()._build_loss()  # nnU-Net's loss for labels/regions/ignore, in its DS wrapper
        has_ignore = self.label_manager.ignore_label is not None
        boundary = compat.dice_ce_loss(self.configuration_manager.batch_dice,
                                       ignore_label=BOUNDARY_IGNORE if has_ignore else None, ddp=self.is_ddp)
        if self._do_i_compile():
            boundary.dc = torch.compile(boundary.dc)
        boundary = compat.deep_supervision_loss(boundary, segmentation.weight_factors)
        targets = BoundaryTargets(self.label_manager.has_regions, self.label_manager.ignore_label,
                                  from_each_scale=self.boundary_targets_from_each_scale)
        return BoundaryAwareLoss(segmentation, boundary, targets)
